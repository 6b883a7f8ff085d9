"""A real two-node Ray cluster on this machine (token auth on) and a real `mlflow server`: the quickstart-size
sweep submitted with `flexkd submit --wait` and with the raw `ray job submit` CLI.

Only processes this test started are ended, by pid: the MLflow server's process group, and the Ray processes
whose command line names this test's own temp dir (never `ray stop`, which ends every Ray on the host).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tuning import registry, tracking
from tuning.submit import EXCLUDES

from .fixtures import mlflow_server

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ours(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (this test's Ray temp dir)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # not up yet
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f}s")


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + worker (2 CPUs), each with its own temp dir and ports, token auth on; an MLflow server."""
    temp = Path(
        tempfile.mkdtemp(prefix="fk-", dir="/tmp")
    )  # short: Ray's socket paths must stay under 107 chars
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The nodes' `python` is this virtualenv's, as on a cluster whose image has the project installed.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    (
        gcs,
        dash,
        head_nm,
        head_om,
        head_agent,
        head_agent_http,
        head_rt,
        head_metrics,
        client_port,
        w_nm,
        w_om,
        w_agent,
        w_agent_http,
        w_rt,
        w_metrics,
        mlflow_port,
    ) = free_ports(16)
    ray = str(VENV_BIN / "ray")
    procs = {}
    try:
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                f"--port={gcs}",
                "--num-cpus=1",
                f"--temp-dir={temp}/head",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--node-manager-port={head_nm}",
                f"--object-manager-port={head_om}",
                f"--dashboard-agent-grpc-port={head_agent}",
                f"--dashboard-agent-listen-port={head_agent_http}",
                f"--runtime-env-agent-port={head_rt}",
                f"--metrics-export-port={head_metrics}",
                f"--ray-client-server-port={client_port}",
                "--min-worker-port=20000",
                "--max-worker-port=20999",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            [
                ray,
                "start",
                f"--address=127.0.0.1:{gcs}",
                "--num-cpus=2",
                f"--temp-dir={temp}/worker",
                f"--node-manager-port={w_nm}",
                f"--object-manager-port={w_om}",
                f"--dashboard-agent-grpc-port={w_agent}",
                f"--dashboard-agent-listen-port={w_agent_http}",
                f"--runtime-env-agent-port={w_rt}",
                f"--metrics-export-port={w_metrics}",
                "--min-worker-port=21000",
                "--max-worker-port=21999",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        address = f"http://127.0.0.1:{dash}"
        headers = {"Authorization": f"Bearer {token}"}
        wait_for(
            lambda: requests.get(f"{address}/api/version", headers=headers, timeout=3).ok,
            120,
            "the job server",
        )
        # Token auth is on: without the token the job server refuses.
        assert requests.get(f"{address}/api/jobs/", timeout=5).status_code in (401, 403)

        store = temp / "mlflow"
        store.mkdir()
        procs["mlflow"] = mlflow_server(store, mlflow_port, env)
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_for(lambda: requests.get(f"{uri}/health", timeout=3).ok, 180, "the MLflow server")
        yield {"address": address, "token": token, "uri": uri, "env": env, "temp": temp}
    finally:
        if "mlflow" in procs:
            os.killpg(procs["mlflow"].pid, signal.SIGKILL)  # the server and its uvicorn workers: our group
            procs["mlflow"].wait()
        for pid in ours(str(temp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def sweep_overrides(teacher: str) -> list[str]:
    return [
        f"teacher.path={teacher}",
        "trials=3",
        "concurrency=2",
        "train.steps=30",
        "train.eval_every=15",
        "train.log_every=15",
        "eval.max_examples=64",
        "data.max_train_examples=300",
        "scoring.num_examples=32",
    ]


def check_store(uri: str, experiment: str, parents: int) -> list:
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    parent_runs = client.search_runs([exp.experiment_id], filter_string="tags.`flexkd.sweep` != ''")
    assert len(parent_runs) == parents and all(r.info.status == "FINISHED" for r in parent_runs)
    kids = tracking.children(uri, parent_runs[0].info.run_id, exp.experiment_id)
    assert len(kids) == 3
    # The champion is the best of the sweeps' bests: a later sweep moves it only when it beats it.
    bests = [client.get_run(p.data.tags["flexkd.best_run_id"]) for p in parent_runs]
    champion = max(bests, key=lambda r: r.data.metrics["val/accuracy"])
    version = client.get_model_version_by_alias("flexkd-demo-student", registry.CHAMPION)
    assert (
        client.get_run(version.run_id).data.metrics["val/accuracy"] == champion.data.metrics["val/accuracy"]
    )
    return kids


def test_flexkd_submit_and_ray_job_submit_run_the_sweep_across_two_nodes(cluster, disk, capfd):
    from tuning.cli import main

    env_before = dict(os.environ)
    os.environ.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster["token"], MLFLOW_TRACKING_URI=cluster["uri"]
    )
    try:
        # --- flexkd submit --wait -------------------------------------------------------------------------
        storage = cluster["temp"] / "storage"  # what every node shares on a real cluster
        code = main(
            [
                "submit",
                "quickstart",
                *sweep_overrides(str(disk["teacher_cls"])),
                f"storage_path={storage}",
                "--address",
                cluster["address"],
                "--wait",
            ]
        )
        out = capfd.readouterr().out
        assert code == 0, out[-4000:]
        assert "SUCCEEDED" in out and "ray job logs --address" in out and cluster["token"] not in out
        kids = check_store(cluster["uri"], "flexkd-quickstart", parents=1)
        nodes = {k.data.tags.get("flexkd.node_id") for k in kids}
        assert len(nodes) == 2, nodes  # the head has 1 CPU: two trials at once cannot both fit there
        # The sweep's files outlive the job: in its storage, not in the job's temporary working directory.
        assert {"quickstart-best.yaml", "quickstart-leaderboard.csv", "quickstart.latest.json"} <= {
            p.name for p in storage.iterdir()
        }
        assert f"best config: {storage}/quickstart-best.yaml" in out
    finally:
        os.environ.clear()
        os.environ.update(env_before)

    # --- the raw CLI: ray job submit ... -- python -m tuning.cli sweep ... ------------------------------------
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": cluster["uri"]}, "excludes": EXCLUDES}
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        cluster["address"],
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "-m",
        "tuning.cli",
        "sweep",
        "quickstart",
        *sweep_overrides(str(disk["teacher_cls"])),
    ]
    done = subprocess.run(
        cmd, env={**cluster["env"], "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()  # "Job 'raysubmit_...' succeeded"
    check_store(cluster["uri"], "flexkd-quickstart", parents=2)
