"""The `flexkd` console script: one entry point, one subcommand per verb.

    flexkd show    CONFIG [key=value ...] [--keys] [--check]
    flexkd teacher CONFIG [key=value ...]
    flexkd train   CONFIG [key=value ...] [--resume]
    flexkd score   CONFIG [key=value ...]
    flexkd signals CONFIG [key=value ...] [--list] [--delete KEY|all]
    flexkd eval    CONFIG [key=value ...] --model DIR [--split val|test|val-unseen|test-unseen]
    flexkd sweep   SWEEP  [key=value ...] [--dry-run] [--resume]
    flexkd submit  SWEEP  [key=value ...] --address URL [--wait] [--dry-run]

CONFIG is a preset name (`flexkd show --presets` lists them) or a YAML file. Every check runs before
anything heavy is imported or started; a bad input ends with one line naming the key or file, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from flexkd.config import ConfigError, dump_yaml, key_docs, load_config, preset_names

EXIT_CONFIG = 2
log = logging.getLogger("flexkd")


def _setup_logging(quiet: bool) -> None:
    # Our progress lines say what is happening; the libraries' per-file progress bars only add noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flexkd: %(message)s"))
    logger = logging.getLogger("flexkd")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _print_json(metrics: dict) -> None:
    print(json.dumps(metrics, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------------------
# Subcommands. Each takes the parsed args and returns an exit code.


def cmd_show(args) -> int:
    if args.presets:
        print("\n".join(preset_names()))
        return 0
    if args.keys:
        for key, doc in key_docs().items():
            print(f"{key:28s} {doc}")
        return 0
    if not args.config:
        raise ConfigError(
            "CONFIG: give a preset name or a YAML file (flexkd show --presets lists the presets)"
        )
    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(cfg), end="")
    if args.check:
        from flexkd.checks import preflight, teacher_ready
        from flexkd.config import uses_teacher
        from flexkd.signals import attach

        plan = preflight(cfg, teacher_missing_ok=True)
        if teacher_ready(cfg):
            attach(cfg, plan)
        print(f"# checks passed: {plan.describe()}")
        print(f"# {plan.data}")
        for note in plan.notes:
            print(f"# note: {note}")
        if plan.pending:
            print(f"# not checked until the teacher exists: {'; '.join(plan.pending)}")
        if uses_teacher(cfg) and not teacher_ready(cfg) and not cfg.teacher.auto_prepare:
            command = " ".join(["flexkd teacher", args.config, *args.overrides])
            how = (
                f"make it with `{command}`, or set teacher.auto_prepare=true"
                if cfg.teacher.base or cfg.teacher.arch
                else "give teacher.base or teacher.arch and run `flexkd teacher` (or set teacher.auto_prepare=true), "
                "or point teacher.path at a fine-tuned model"
            )
            print(f"# teacher.path: {cfg.teacher.path} does not exist yet; {how}")
    return 0


def cmd_teacher(args) -> int:
    from flexkd.runs import prepare_teacher

    cfg = load_config(args.config, args.overrides)
    _print_json(prepare_teacher(cfg, quiet=args.quiet))
    print(f"teacher saved to {cfg.teacher.path}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from flexkd.checks import preflight

    cfg = load_config(args.config, args.overrides)
    plan = preflight(cfg)  # before torch or Ray is imported: a bad input fails in a fraction of a second
    log.info("%s", plan.data)
    if plan.workers >= 1:
        from tuning.ray_train import fit

        metrics = fit(cfg, plan, quiet=args.quiet, resume=args.resume)
    else:
        from flexkd.runs import distil

        metrics = distil(cfg, plan, quiet=args.quiet, resume=args.resume)
    _print_json(metrics)
    print(f"artifacts in {cfg.run.output_dir}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from flexkd.runs import check_scoring

    cfg = load_config(args.config, args.overrides)
    plan = check_scoring(cfg)
    log.info("%s", plan.data)
    if plan.workers >= 1:
        from tuning.ray_train import score

        path, _ = score(cfg, plan, quiet=args.quiet)
    else:
        from flexkd.runs import score_only

        path = score_only(cfg, plan)
    print(path)
    return 0


def cmd_signals(args) -> int:
    from flexkd import signals as sig

    if args.list or args.delete:
        cfg = load_config(args.config or "demo", args.overrides)
        store = sig.Store(cfg.signals.path)
        found = sig.manifests(store)
        if args.delete:
            names = [n for n, _ in found] if args.delete == "all" else [args.delete]
            for name in names:
                if not store.exists(name):
                    raise ConfigError(f"--delete: no teacher signals {name!r} in {cfg.signals.path}")
                store.delete(name)
                print(f"deleted {store.path(name)}")
            return 0
        print(f"teacher signals in {cfg.signals.path}: {len(found)}")
        for name, m in found:
            sizes, spec = m["sizes"], m["spec"]
            logits = (
                f"top-{spec['top_k']} logits"
                if spec["top_k"]
                else ("full logits" if spec["causal"] else "class logits")
            )
            print(
                f"{name}  {m['examples']} examples  layers {spec['layers']}  {spec['dtype']}  {logits}  "
                f"{sizes['bytes'] / 1e6:.1f} MB  {sizes['bytes_per_token']:.0f} B/token  built {m['created']}"
            )
        return 0
    from flexkd.checks import preflight
    from flexkd.runs import ensure_teacher
    from tuning.signals import build

    cfg = load_config(args.config, args.overrides)
    plan = preflight(cfg)
    if not plan.teacher:
        raise ConfigError("teacher.path: this config reads no teacher, so it has no teacher signals to build")
    ensure_teacher(cfg, quiet=args.quiet)
    manifest = build(cfg, plan, quiet=args.quiet)
    sizes = manifest["sizes"]
    print(
        f"{manifest['folder']}: {manifest['examples']} examples, {sizes['tokens']} tokens, "
        f"{sizes['bytes'] / 1e6:.1f} MB ({sizes['bytes_per_token']:.0f} B/token)"
    )
    return 0


def cmd_eval(args) -> int:
    from flexkd.checks import check_data, check_label_count, check_model_folder

    cfg = load_config(args.config, args.overrides)
    check_model_folder(args.model, cfg.data.task)  # before torch: a wrong folder fails at once
    if cfg.data.task == "classification":
        check_label_count("--model", args.model, check_data(cfg)[2])
    else:
        check_data(cfg)
    from flexkd.runs import evaluate_saved

    _print_json(evaluate_saved(cfg, args.model, args.split))
    return 0


def cmd_sweep(args) -> int:
    from tuning.space import check_space_files, describe, load_sweep

    spec, raw = load_sweep(args.config, args.overrides)
    plan = check_space_files(
        spec
    )  # before Ray, MLflow or even their imports: a bad sweep file writes nothing
    log.info("%s (the base config's)", plan.data)
    if args.dry_run:
        print(describe(spec))
        return 0
    from tuning.sweep import run_sweep

    summary = run_sweep(spec, raw, resume=args.resume, quiet=args.quiet)
    return 0 if "best" in summary else 1


def cmd_submit(args) -> int:
    from tuning.submit import build_request, show, submit

    request = build_request(
        args.config,
        args.overrides,
        tracking_uri=args.tracking_uri,
        env=args.env,
        pip=args.pip,
        working_dir=args.working_dir,
        resume=args.resume,
    )
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.dry_run:
        print(f"POST {address or '<--address>'}/api/jobs/")
        print(show(request))
        return 0
    if not address:
        raise ConfigError(
            "--address: give the cluster's job server, e.g. http://127.0.0.1:8265 (or set RAY_ADDRESS)"
        )
    return submit(request, address, wait=args.wait)


COMMANDS = {
    "show": (cmd_show, "print the resolved config (--check: also run the file-level checks)"),
    "teacher": (cmd_teacher, "fine-tune the teacher on the task and save it at teacher.path"),
    "train": (cmd_train, "distil the student (Ray Train when scaling.num_workers >= 1)"),
    "score": (
        cmd_score,
        "score and select teacher units; write selection.json only (sharded on Ray when scaling.num_workers >= 1)",
    ),
    "signals": (
        cmd_signals,
        "run the teacher once over the training rows (Ray Data) and store its signals; --list, --delete",
    ),
    "eval": (cmd_eval, "evaluate a saved model folder on the config's val or test split"),
    "sweep": (cmd_sweep, "search with Ray Tune + Optuna; every trial and the best students in MLflow"),
    "submit": (cmd_submit, "run a sweep on a Ray cluster as a Ray job (Jobs SDK)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexkd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        what = (
            "sweep file or shipped sweep (quickstart, comparison)"
            if name in ("sweep", "submit")
            else "preset name or YAML file"
        )
        p.add_argument("config", nargs="?" if name in ("show", "signals") else None, help=what)
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. selection.k=16")
        p.add_argument("--quiet", action="store_true", help="no progress lines")
        p.set_defaults(fn=fn)
        if name == "show":
            p.add_argument("--keys", action="store_true", help="list every config key with its meaning")
            p.add_argument("--presets", action="store_true", help="list the shipped presets")
            p.add_argument("--check", action="store_true", help="also check models, tokenizers and data")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
        if name == "sweep":
            p.add_argument(
                "--dry-run", action="store_true", help="print the resolved space, resources and concurrency"
            )
            p.add_argument("--resume", action="store_true", help="continue the newest sweep of this name")
        if name == "submit":
            p.add_argument(
                "--address",
                help="the cluster's job server, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)",
            )
            p.add_argument(
                "--wait",
                action="store_true",
                help="stream the job's logs until it ends; exit with its status",
            )
            p.add_argument(
                "--dry-run", action="store_true", help="print the request (secrets masked) and send nothing"
            )
            p.add_argument(
                "--tracking-uri", help="MLflow server the job records to (default: MLFLOW_TRACKING_URI)"
            )
            p.add_argument(
                "--env",
                action="append",
                default=[],
                metavar="NAME[=VALUE]",
                help="environment variable for the job (repeatable)",
            )
            p.add_argument(
                "--pip",
                action="append",
                default=[],
                metavar="REQUIREMENT",
                help="pip requirement for the job's runtime_env (repeatable)",
            )
            p.add_argument("--working-dir", help="source tree to upload (default: this checkout)")
            p.add_argument(
                "--resume", action="store_true", help="the job continues the newest sweep of this name"
            )
        if name == "signals":
            p.add_argument("--list", action="store_true", help="list the caches under signals.path")
            p.add_argument("--delete", metavar="KEY", help="delete one cache (its folder name) or all")
        if name == "eval":
            p.add_argument("--model", required=True, help="model folder, e.g. RUN/student")
            p.add_argument(
                "--split",
                default="test",
                choices=["val", "test", "train", "val-unseen", "test-unseen"],
                help="*-unseen: only the held-out rows whose input no training row has",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also come after options (`flexkd eval demo --model DIR eval.max_examples=40`).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.quiet)
    from tuning.session import split_uri_credentials
    from tuning.submit import redact
    from tuning.tracking import SweepRecordsError

    split_uri_credentials()  # user:password@ of the tracking URI -> MLFLOW_TRACKING_USERNAME/PASSWORD
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"flexkd: error: {redact(str(err))}", file=sys.stderr)  # e.g. a tracking URI's userinfo
        return EXIT_CONFIG
    except SweepRecordsError as err:
        print(f"flexkd: error: {redact(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "flexkd: interrupted; checkpoints written so far are kept (flexkd train ... --resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
