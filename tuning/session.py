"""Starting (or joining) Ray without stepping on anyone else's cluster.

- Under `ray job submit` (``RAY_ADDRESS`` is set), join that cluster with a plain ``ray.init()``.
- Otherwise start a private local cluster with ``address="local"`` and explicit CPU counts, so a Ray that
  somebody else runs on the same machine is never joined, and never stopped: ``ray.shutdown()`` ends only
  what this process started (``ray stop`` would end every Ray on the host, so nothing here calls it).

The dashboard is started on a free port of 127.0.0.1: Ray Train's placement-group cleaner reads actor
states through it, which is what frees the workers of a Tune trial that ASHA stops mid-fit.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("flexkd")

# Passed to every Ray worker: offline-friendly, quiet libraries, and the tracking store of this driver.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def worker_env() -> dict[str, str]:
    env = dict(QUIET_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Make sure this process is connected to Ray. Returns True when it started a local cluster itself.

    num_cpus: logical CPUs of a local cluster (default: this machine's count).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    runtime_env = {"env_vars": worker_env()}
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's runtime_env already carries the environment (Ray refuses a
        # second one beside it); set the quiet defaults for this driver and its workers through it.
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(log_to_driver=not quiet)
        return False
    cpus = num_cpus or os.cpu_count() or 1
    log.info("starting a local Ray cluster (%d CPUs)", cpus)
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(),
        runtime_env=runtime_env,
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return True
