"""`flexkd submit`: send a sweep to a running Ray cluster as a Ray job (the Jobs SDK).

The request is what `ray job submit` would send: an entrypoint (``python -m tuning.cli sweep ...``, which
works from the uploaded working directory whether or not the cluster's image has flexkd installed) and a
``runtime_env`` with the project as working_dir (without virtualenvs, run folders, checkpoints or MLflow
files), optional pip requirements, and environment variables such as ``MLFLOW_TRACKING_URI``.

Credentials are never printed: ``--dry-run`` shows the request with secret-looking values masked, and the
Ray token goes in an ``Authorization`` header read from where Ray keeps it (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from flexkd.config import ConfigError

# Never uploaded (gitignore-style patterns, as Ray's runtime_env ``excludes``): tool and run folders, files
# that hold secrets, weights and archives. Virtualenvs of any name are added per tree (``upload_excludes``).
EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "flexkd-runs",
    "mlflow.db",
    "mlruns",
    "mlartifacts",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
    # secrets
    ".env",
    "*.env",
    ".env.*",
    ".netrc",
    ".git-credentials",
    "*.pem",
    "*.key",
    # weights and archives
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.bin",
    "*.safetensors",
    "*.gguf",
    "*.onnx",
    "*.whl",
    "*.tar",
    "*.tar.gz",
    "*.tgz",
    "*.zip",
]
# One list of what a secret's name looks like; every request, env dict, log line and error shown is masked
# by it.
SECRET_NAMES = (
    "PASSWORD",
    "PASSWD",
    "PASS",
    "PWD",
    "TOKEN",
    "SECRET",
    "CREDENTIAL",
    "KEY",
    "AUTH",
    "PRIVATE",
    "COOKIE",
    "SIGNATURE",
)
SECRET = re.compile(r"[A-Za-z0-9_.\-]*(?:" + "|".join(SECRET_NAMES) + r")[A-Za-z0-9_.\-]*", re.IGNORECASE)
NOT_SECRET = {"PWD", "OLDPWD", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "KEY"}  # names, not values


def is_secret_name(name: str) -> bool:
    return name.upper() not in NOT_SECRET and SECRET.fullmatch(name) is not None


def mask_env(env: dict) -> dict:
    """A copy of an env dict with the values of secret-looking names masked."""
    return {k: "***" if is_secret_name(k) and v else v for k, v in env.items()}


def redact(text: str) -> str:
    """Mask what looks like a credential in text: ``user:pass@`` in URLs, bearer/basic tokens, and
    ``NAME=value`` / ``NAME: value`` / ``"NAME": "value"`` where NAME looks like a secret (``SECRET_NAMES``)."""
    text = re.sub(r"(://[^/:@\s]+):[^@/\s]+@", r"\1:***@", text)
    text = re.sub(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=\-]+", r"\1\2***", text)

    def quoted(m: re.Match) -> str:  # "NAME": "value"
        return m.group(1) + ('"***"' if is_secret_name(m.group(2)) else m.group(3))

    def bare(m: re.Match) -> str:  # NAME=value
        return m.group(1) + ("***" if is_secret_name(m.group(2)) else m.group(3))

    text = re.sub(r'("([\w.\-]+)"\s*:\s*)("[^"]*")', quoted, text)
    text = re.sub(r"(\b([A-Za-z_][\w.\-]*)=)(\"[^\"]*\"|'[^']*'|[^\s,;&]+)", bare, text)
    return text


def upload_excludes(root: Path) -> list[str]:
    """``EXCLUDES`` plus every virtualenv under ``root`` (a folder holding ``pyvenv.cfg``, whatever its name)."""
    out = list(EXCLUDES)
    for cfg in sorted(root.rglob("pyvenv.cfg")):
        rel = cfg.parent.relative_to(root).as_posix()
        out.append(f"/{rel}/" if rel != "." else "/*")
    return out


def upload_listing(root: Path, excludes: list[str]) -> list[tuple[str, int]]:
    """(relative path, bytes) of each file Ray would upload from ``root`` with ``excludes`` (Ray's own
    gitignore-style matcher when importable)."""
    try:
        from ray._private.runtime_env.packaging import _get_excludes

        excluded = _get_excludes(root, excludes)
    except ImportError:  # Ray's matcher is pathspec's gitwildmatch
        from pathspec import PathSpec

        spec = PathSpec.from_lines("gitwildmatch", excludes)

        def excluded(p: Path) -> bool:
            return spec.match_file(str(p.relative_to(root)))

    files = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not excluded(here / d))
        for name in sorted(names):
            path = here / name
            if not excluded(path) and path.is_file():
                files.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return files


def upload_limit() -> int:
    try:
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

        return int(GCS_STORAGE_MAX_SIZE)
    except ImportError:
        return 512 * 1024 * 1024


def check_upload(root: Path, excludes: list[str]) -> tuple[int, int]:
    """(files, bytes) of the upload; ConfigError above Ray's package limit."""
    files = upload_listing(root, excludes)
    size = sum(n for _, n in files)
    if size >= upload_limit():
        biggest = ", ".join(f"{p} ({n / 2**20:.0f} MiB)" for p, n in sorted(files, key=lambda f: -f[1])[:3])
        raise ConfigError(
            f"--working-dir: {root} would upload {len(files)} files, {size / 2**20:.0f} MiB, over Ray's "
            f"{upload_limit() / 2**20:.0f} MiB package limit (largest: {biggest}); move them out or exclude them"
        )
    return len(files), size


def project_root() -> Path | None:
    """The source tree to upload: the checkout this package runs from, if it is one (editable install)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "flexkd").is_dir() else None


def ray_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path("~/.ray/auth_token").expanduser())
    if Path(path).is_file():
        return Path(path).read_text().strip() or None
    return None


def build_request(
    sweep: str,
    overrides: list[str],
    *,
    tracking_uri: str | None,
    env: list[str] = (),
    pip: list[str] = (),
    working_dir: str | None = None,
    resume: bool = False,
) -> dict:
    """The job request: entrypoint, runtime_env, submission id and metadata. Checks before anything is sent."""
    from tuning.space import find_sweep_file, load_sweep, sweep_names

    spec, _ = load_sweep(
        sweep, overrides
    )  # every key checked here, on the laptop, before the cluster sees it
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI: {uri or 'not set'}; a cluster job records to a tracking server that every node "
            f"reaches (see cluster/README.md): set it or pass --tracking-uri"
        )
    if not spec.storage_path:
        # The job's working directory is a temporary copy on the head node: best.yaml, the leaderboard and
        # the --resume pointer written there are gone with the job.
        raise ConfigError(
            "storage_path: a cluster sweep keeps its state, best config and leaderboard in a folder every "
            "node shares (e.g. storage_path=/mnt/flexkd/ray, see cluster/README.md); the job's working "
            "directory is temporary"
        )
    root = Path(working_dir).resolve() if working_dir else project_root()
    if sweep in sweep_names() and not Path(sweep).exists():
        sweep_arg = sweep
    else:
        path = find_sweep_file(sweep)
        if root is None or not path.is_relative_to(root):
            raise ConfigError(
                f"SWEEP: {path} is outside the uploaded working directory ({root}); move it into the project"
            )
        sweep_arg = str(path.relative_to(root))
    env_vars = {"MLFLOW_TRACKING_URI": uri}
    from tuning.tracking import git_revision

    commit, dirty = git_revision()  # the job's working directory is an upload without .git: say it here
    if commit:
        env_vars["FLEXKD_GIT_COMMIT"] = commit + ("+dirty" if dirty else "")
    for item in env:
        name, _, value = item.partition("=")
        if not value:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: not set in this shell; give --env {name}=VALUE")
            value = os.environ[name]
        env_vars[name] = value
    runtime_env: dict = {"env_vars": env_vars}
    if root is not None:
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = upload_excludes(root)
    if pip:
        runtime_env["pip"] = list(pip)
    words = ["python", "-m", "tuning.cli", "sweep", sweep_arg, *overrides]
    if resume:
        words.append("--resume")
    return {
        "entrypoint": shlex.join(words),
        "runtime_env": runtime_env,
        "submission_id": f"flexkd-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        "metadata": {"flexkd.sweep": spec.name, "flexkd.trials": str(spec.trials)},
    }


def show(request: dict) -> str:
    """The request as JSON, secrets masked, and what its working_dir upload holds."""
    runtime_env = dict(request["runtime_env"])
    runtime_env["env_vars"] = mask_env(runtime_env.get("env_vars", {}))
    text = redact(json.dumps({**request, "runtime_env": runtime_env}, indent=1))
    if "working_dir" in runtime_env:
        count, size = check_upload(Path(runtime_env["working_dir"]), runtime_env["excludes"])
        text += f"\nupload: {count} files, {size / 2**20:.2f} MiB from {runtime_env['working_dir']}"
    return text


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = ray_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"--address: cannot reach the Ray job server at {address} ({redact(str(err).splitlines()[0])})"
        ) from None


def submit(request: dict, address: str, wait: bool = False, out=None) -> int:
    """Submit; print the job id and how to follow or stop it; with ``wait``, stream logs until it ends."""
    out = out or sys.stdout
    jobs = client(address)
    job_id = jobs.submit_job(**request)
    print(f"submitted {job_id} to {address}", file=out)
    print(f"  follow: ray job logs --address {address} --follow {job_id}", file=out)
    print(f"  status: ray job status --address {address} {job_id}", file=out)
    print(f"  stop:   ray job stop --address {address} {job_id}", file=out)
    if not wait:
        return 0

    async def stream():
        async for chunk in jobs.tail_job_logs(job_id):
            print(redact(chunk), end="", file=out, flush=True)

    asyncio.run(stream())
    status = jobs.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(1)
        status = jobs.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", file=out)
    return 0 if status.value == "SUCCEEDED" else 1
