"""Secrets stay out of every file: Ray's logs, run folders and uploads; masking; a loopback-only local Ray.

The Ray test runs a real tiny sweep in a subprocess of its own (a private Ray started with a planted
password in the environment: the session-wide ``ray_cluster`` would already be running without it), then
greps every file it left, Ray's session folder included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from tuning.session import split_uri_credentials
from tuning.submit import EXCLUDES, is_secret_name, mask_env, redact, upload_excludes, upload_listing

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize(
    "name, secret",
    [
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("MLFLOW_TRACKING_TOKEN", True),
        ("DB_PASS", True),
        ("FTP_PASSWD", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("GOOGLE_APPLICATION_CREDENTIALS", True),
        ("HF_AUTH", True),
        ("HF_TOKEN", True),
        ("OPENAI_API_KEY", True),
        ("RAY_AUTH_TOKEN", True),
        ("my_private_key", True),
        ("MLFLOW_TRACKING_URI", False),
        ("HF_HOME", False),
        ("PATH", False),
        ("RAY_AUTH_MODE", False),
    ],
)
def test_secret_names_are_masked_in_env_dicts_and_text(name, secret):
    value = secrets.token_hex(8)
    assert is_secret_name(name) is secret
    assert (mask_env({name: value})[name] == "***") is secret
    for text in (f"{name}={value}", json.dumps({name: value})):
        assert (value not in redact(text)) is secret, text


def test_urls_and_bearer_tokens_are_masked():
    value = secrets.token_hex(8)
    shown = redact(f"MLFLOW_TRACKING_URI: cannot use https://alice:{value}@mlflow:5000: 401; Bearer {value}")
    assert value not in shown and "https://alice:***@mlflow:5000" in shown


def test_a_uri_userinfo_moves_into_mlflow_credentials():
    env = {"MLFLOW_TRACKING_URI": "https://alice:s%40cret@mlflow.example:5000/base"}
    split_uri_credentials(env)
    assert env == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example:5000/base",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "s@cret",
    }


# ---------------------------------------------------------------------------------------------------------
# Uploads


def test_dry_run_upload_leaves_out_secrets_weights_archives_and_any_venv(tmp_path, monkeypatch, capsys):
    from tuning.cli import main

    tree = tmp_path / "proj"
    for rel, text in {
        "pyproject.toml": "[project]\nname='x'\n",
        "flexkd/__init__.py": "",
        "sweeps/s.yaml": yaml.safe_dump({"name": "s", "base": "demo", "trials": 1}),
        "keep.py": "print(1)\n",
        ".env": "DB_PASS=x\n",
        "conf/mlflow.env": "MLFLOW_TRACKING_PASSWORD=x\n",
        ".netrc": "machine h login u password x\n",
        "id.pem": "x",
        "model.safetensors": "x" * 100,
        "ckpt/model.pth": "x",
        "x.whl": "x",
        "data.tar.gz": "x",
        "env/pyvenv.cfg": "home = /usr\n",
        "env/lib/site.py": "x",
    }.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    listed = {p for p, _ in upload_listing(tree, upload_excludes(tree))}
    assert listed == {"pyproject.toml", "flexkd/__init__.py", "sweeps/s.yaml", "keep.py"}
    assert "*.whl" in EXCLUDES and ".whl" not in EXCLUDES

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DB_PASS", "hunter2-" + secrets.token_hex(4))
    code = main(
        [
            "submit",
            str(tree / "sweeps/s.yaml"),
            "--dry-run",
            "--address",
            "http://127.0.0.1:8265",
            "--working-dir",
            str(tree),
            "--env",
            "DB_PASS",
            "storage_path=/mnt/x",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    size = sum(len((tree / p).read_text()) for p in listed)
    assert f"upload: 4 files, {size / 2**20:.2f} MiB" in out
    assert os.environ["DB_PASS"] not in out and '"DB_PASS": "***"' in out


# ---------------------------------------------------------------------------------------------------------
# A real local Ray and a real sweep


SCRIPT = textwrap.dedent(
    """
    import json, os, re, subprocess, sys
    import ray
    from tuning.space import load_sweep
    from tuning.sweep import run_sweep

    def descendants(root):
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    pass
        out, todo = {root}, [root]
        while todo:
            here = todo.pop()
            kids = [c for c, pp in parent.items() if pp == here]
            out.update(kids)
            todo.extend(kids)
        return out

    spec, raw = load_sweep(sys.argv[1])
    summary = run_sweep(spec, raw, quiet=True, num_cpus=2)

    @ray.remote
    def worker_sees():
        from tuning.session import load_worker_secrets
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)  # a local worker also inherits the driver's env
        path = os.environ.get("FLEXKD_SECRETS_FILE", "")
        mode = oct(os.stat(path).st_mode & 0o777) if path else None
        load_worker_secrets()
        return mode, os.environ.get("MLFLOW_TRACKING_PASSWORD"), os.environ.get("MLFLOW_TRACKING_URI")

    mode, after, uri = ray.get(worker_sees.remote())
    pids = descendants(os.getpid())
    listening = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        if {int(p) for p in re.findall(r"pid=(\\d+)", line)} & pids:
            listening.append(line.split()[3] + " " + "".join(re.findall(r'[(][(]"([^"]+)"', line)))
    node = ray._private.worker.global_worker.node
    print("RESULT " + json.dumps({
        "session": node.get_session_dir_path(), "node_ip": node.node_ip_address, "listening": listening,
        "mode": mode, "after": after, "uri": uri,
        "statuses": [r["status"] for r in summary["leaderboard"]],
    }))
    ray.shutdown()
    """
)


def test_a_planted_password_reaches_the_trial_and_no_file(disk, tmp_path):
    password = secrets.token_hex(16)
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "secret-probe",
                "base": "demo",
                "overrides": [
                    f"teacher.path={disk['teacher_cls']}",
                    "train.steps=6",
                    "train.eval_every=6",
                    "train.log_every=3",
                    "eval.max_examples=32",
                    "data.max_train_examples=200",
                    "scoring.num_examples=16",
                    "optim.warmup_steps=0",
                ],
                "space": {"optim.lr": {"choice": [0.001]}},
                "trials": 1,
                "concurrency": 1,
                "scheduler": {"name": "none"},
                "tracking": {"experiment": "test-secrets", "register_top": 0},
            }
        )
    )
    # Ray's own temp folder for this test (short: Ray's socket paths must fit in 107 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="fkr-", dir="/tmp"))
    try:
        _run_and_grep(sweep, ray_tmp, password, tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _run_and_grep(sweep, ray_tmp, password, tmp_path):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_PASSWORD": password,
        "MLFLOW_TRACKING_USERNAME": "alice",
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the embedded SQLite store under tmp_path
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(sweep)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["statuses"] == ["completed"]
    # The worker reads the password from the driver's 0600 secrets file (its path is all Ray forwards).
    assert result["mode"] == "0o600" and result["after"] == password

    session = Path(result["session"])
    assert session.is_relative_to(ray_tmp), session
    scanned, hits = 0, []
    for path in [*tmp_path.rglob("*"), *ray_tmp.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            scanned += 1
            if password.encode() in path.read_bytes():
                hits.append(str(path))
    assert scanned > 50  # Ray's logs, Tune's state, the MLflow store and artifacts were all there
    assert hits == []
    # Bound to the loopback interface on every port this session's processes listen on.
    assert result["node_ip"] == "127.0.0.1"
    outside = [a for a in result["listening"] if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:"))]
    assert result["listening"] and outside == [], outside
