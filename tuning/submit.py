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

EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "flexkd-runs",
    "mlflow.db",
    "mlruns",
    "mlartifacts",
    "**/__pycache__",
    "*.pt",
    "*.safetensors",
    "*.bin",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
    ".whl",
]
SECRET = re.compile(r"(PASSWORD|TOKEN|SECRET|KEY|CREDENTIAL)", re.IGNORECASE)


def redact(text: str) -> str:
    """Mask what looks like a credential in a line of text: ``user:pass@`` in URLs, bearer tokens, and
    ``NAME=value`` / ``"NAME": "value"`` where NAME mentions a password, token, secret or key."""
    text = re.sub(r"(://[^/:@\s]+):[^@/\s]+@", r"\1:***@", text)
    text = re.sub(r"(?i)(bearer\s+)[A-Za-z0-9._\-]+", r"\1***", text)
    text = re.sub(r"(?i)\b(\w*(?:password|token|secret|key)\w*)=(\S+)", r"\1=***", text)
    text = re.sub(r'(?i)("\w*(?:password|token|secret|key)\w*"\s*:\s*)"[^"]*"', r'\1"***"', text)
    return text


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
        runtime_env["excludes"] = list(EXCLUDES)
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
    return redact(json.dumps(request, indent=1))


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
