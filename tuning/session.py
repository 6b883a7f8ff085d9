"""Starting (or joining) Ray without stepping on anyone else's cluster, and without leaking a credential.

- Under `ray job submit` (``RAY_ADDRESS`` is set), join that cluster with a plain ``ray.init()``.
- Otherwise start a private local cluster with ``address="local"`` and explicit CPU counts, so a Ray that
  somebody else runs on the same machine is never joined, and never stopped: ``ray.shutdown()`` ends only
  what this process started (``ray stop`` would end every Ray on the host, so nothing here calls it).

A local cluster's node address is 127.0.0.1, so GCS, raylet, object manager and worker gRPC servers listen
on the loopback interface only (Ray binds them to all interfaces for any other node address); the dashboard
is on a free port of 127.0.0.1 (Ray Train's placement-group cleaner reads actor states through it). Ray's
token authentication (on by default since Ray 2.59) is checked and stated at start.

Credentials: Ray's runtime-env agent writes every ``env_vars`` value of a runtime env into its log, a
world-readable file that outlives the run. So MLflow credentials (and the ``user:password@`` of a tracking
URI) never ride in a runtime env: they go to a file readable by this user only (0600, in a private temp
folder removed at exit) whose path alone is forwarded as ``FLEXKD_SECRETS_FILE``; a worker calls
``load_worker_secrets()`` before its first MLflow call.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("flexkd")

# Passed to every Ray worker in the clear: offline-friendly flags and the tracking store (without userinfo).
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "MLFLOW_TRACKING_URI",
)
# Passed through the secrets file only.
SECRET_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN",
)
SECRETS_FILE_ENV = "FLEXKD_SECRETS_FILE"
QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "View run ... at" once per set_terminated
}
LOCAL_IP = "127.0.0.1"


# ---------------------------------------------------------------------------------------------------------
# Credentials


def split_uri_credentials(env=os.environ) -> None:
    """Move ``user:password@`` out of ``MLFLOW_TRACKING_URI`` into MLFLOW_TRACKING_USERNAME/PASSWORD (which
    MLflow reads), so that the URI itself can be logged, written into a resume pointer or forwarded."""
    uri = env.get("MLFLOW_TRACKING_URI", "")
    parts = urlsplit(uri)
    if not parts.scheme.startswith("http") or "@" not in parts.netloc:
        return
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    from urllib.parse import unquote

    if user:
        env.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    if password:
        env.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    env["MLFLOW_TRACKING_URI"] = urlunsplit(parts._replace(netloc=host))


def write_secrets_file() -> str | None:
    """The secrets of this process's environment in a 0600 file under a private (0700) temp folder, removed
    at exit; None when there is none. Returns its path."""
    secrets = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    if not secrets:
        return None
    folder = tempfile.mkdtemp(prefix="flexkd-secrets-")  # mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "secrets.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(secrets, f)
    return path


def load_worker_secrets() -> None:
    """In a Ray worker: read the driver's secrets file (``FLEXKD_SECRETS_FILE``) into ``os.environ``. Call it
    before the first MLflow call of a worker process; a no-op on the driver and when there is no file."""
    path = os.environ.get(SECRETS_FILE_ENV)
    if not path or not os.path.isfile(path):
        return
    with open(path) as f:
        for key, value in json.load(f).items():
            os.environ.setdefault(key, value)


def worker_env(secrets_file: str | None = None) -> dict[str, str]:
    """The runtime env's ``env_vars``: nothing in it is a secret (Ray logs them)."""
    split_uri_credentials()
    env = dict(QUIET_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    if secrets_file:
        env[SECRETS_FILE_ENV] = secrets_file
    return env


# ---------------------------------------------------------------------------------------------------------
# Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_IP, 0))
        return s.getsockname()[1]


def _loopback_node() -> None:
    """Make Ray keep 127.0.0.1 as the node address. ``ray.init(_node_ip_address="127.0.0.1")`` alone is
    turned back into the machine's outward IP unless Ray believes it cannot cluster (as on macOS): its
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` switch, read at import, so set for this process too."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # a Ray without the switch: the address is still passed
        pass


def token_auth_enabled() -> bool | None:
    """Whether Ray's token authentication is on for this process (None: this Ray cannot say)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return None
    return bool(is_token_auth_enabled())


def start_reaper() -> None:
    """A watcher (tuning/reaper.py) that ends this process's Ray processes if it dies without shutting them
    down (``kill -9``): Ray leaves its dashboard and runtime-env agents running otherwise."""
    import subprocess

    subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("reaper.py")), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the driver's process group: a Ctrl-C there does not reach it
        close_fds=True,
    )


def start_ray(num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Make sure this process is connected to Ray. Returns True when it started a local cluster itself.

    num_cpus: logical CPUs of a local cluster (default: this machine's count).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    split_uri_credentials()  # this driver's own URI (and what it writes) too
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's runtime_env already carries the environment (Ray refuses a
        # second one beside it); set the quiet defaults for this driver and its workers through it.
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(log_to_driver=not quiet)
        return False
    cpus = num_cpus or os.cpu_count() or 1
    runtime_env = {"env_vars": worker_env(write_secrets_file())}
    start_reaper()  # before Ray's processes exist: it notes them as they start
    _loopback_node()
    ray.init(
        address="local",
        num_cpus=cpus,
        _node_ip_address=LOCAL_IP,
        include_dashboard=True,
        dashboard_host=LOCAL_IP,
        dashboard_port=_free_port(),
        runtime_env=runtime_env,
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    auth = token_auth_enabled()
    if auth is False:
        log.warning(
            "local Ray cluster on %s: token authentication is OFF (RAY_AUTH_MODE=%s); any local user can "
            "run code in it",
            LOCAL_IP,
            os.environ.get("RAY_AUTH_MODE", "unset"),
        )
    log.info(
        "started a local Ray cluster (%d CPUs) bound to %s, token auth %s",
        cpus,
        ray._private.worker.global_worker.node.node_ip_address,
        {True: "on", False: "OFF", None: "unknown"}[auth],
    )
    return True
