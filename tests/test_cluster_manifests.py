"""The deployment files under cluster/: they parse, carry what their kind needs, keep credentials out,
and every `flexkd` command in them is one the CLI accepts (a real subcommand, a shipped preset or sweep,
valid keys). Static checks only: no network, no Ray, no Kubernetes, no Docker."""

from __future__ import annotations

import configparser
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from flexkd.config import ConfigError, load_config, preset_names
from tuning.cli import COMMANDS, build_parser
from tuning.space import load_sweep, sweep_names

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher"
MLFLOW = CLUSTER / "mlflow"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
LAUNCHER_FILES = [LAUNCHER / "aws.yaml", LAUNCHER / "gcp.yaml"]
DUMMY_PATH = "/tmp/flexkd-dummy"  # stands for shell variables ($STORAGE) in override values
SWEEP_COMMANDS = ("sweep", "submit")  # subcommands whose first argument is a sweep, not a run preset


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_one(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


def test_the_deployment_files_exist():
    expected = {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/pvc.yaml",
        "kuberay/secret.example.yaml",
        "launcher/aws.yaml",
        "launcher/gcp.yaml",
        "docker/Dockerfile",
        "mlflow/docker-compose.yaml",
        "mlflow/basic_auth.ini",
        "mlflow/mlflow-k8s.yaml",
    }
    assert expected <= {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file()}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses_into_mappings(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs)


# ---------------------------------------------------------------------------------------------------------
# Shell command lines, and the flexkd commands inside them


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, as word lists: split at ; && || | & ( ), redirections dropped,
    and the body of `bash -c '...'` / `sh -c '...'` opened up."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, skip_target = [], [], False
    for token in [*lexer, ";"]:
        if set(token) <= set("();<>|&"):
            if "<" in token or ">" in token:
                if words and words[-1].isdigit():  # the fd of `2>&1`
                    words.pop()
                skip_target = True  # the file of `> file`, or the fd of `>&1`
                continue
            if words:
                commands.append(words)
            words = []
        elif skip_target:
            skip_target = False
        else:
            words.append(token)
    simple = []
    for words in commands:
        if Path(words[0]).name in ("bash", "sh"):
            flag = next((i for i, w in enumerate(words) if re.fullmatch(r"-[a-z]*c[a-z]*", w)), None)
            if flag is not None and flag + 1 < len(words):
                simple += shell_commands(words[flag + 1])
                continue
        simple.append(words)
    return simple


def flexkd_argv(words: list[str]) -> list[str] | None:
    """The arguments of a `flexkd` call (`flexkd ...`, `VAR=x flexkd ...`, `python -m tuning.cli ...`,
    `ray job submit ... -- flexkd ...`)."""
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_]\w*=.*", words[i]):
        i += 1
    for j in range(i, len(words)):
        if j != i and words[j - 1] != "--":
            continue
        if words[j] == "flexkd" or words[j].endswith("/bin/flexkd"):
            return words[j + 1 :]
        if re.fullmatch(r"(.*/)?python[\d.]*", words[j]) and words[j + 1 : j + 3] == ["-m", "tuning.cli"]:
            return words[j + 3 :]
    return None


def check_flexkd(argv: list[str]) -> None:
    """Fail unless `flexkd *argv` names a real subcommand, a shipped preset or sweep, and valid keys."""
    assert argv and argv[0] in COMMANDS, f"flexkd {argv[:1]}: not a subcommand ({', '.join(COMMANDS)})"
    argv = [a.split("=", 1)[0] + "=" + DUMMY_PATH if "=" in a and "$" in a else a for a in argv]
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"flexkd {shlex.join(argv)}: rejected by the argument parser")
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    assert not stray, f"flexkd {shlex.join(argv)}: unrecognized arguments {stray}"
    overrides = [*args.overrides, *extra]
    if args.command == "show" and (args.presets or args.keys):
        return
    if args.command in SWEEP_COMMANDS:
        assert args.config in sweep_names(), f"{args.config}: not a shipped sweep ({sweep_names()})"
        load_sweep(args.config, overrides)  # raises ConfigError on a bad key or value
    else:
        assert args.config in preset_names(), f"{args.config}: not a shipped preset ({preset_names()})"
        load_config(args.config, overrides)


def pod_templates(spec: dict):
    yield spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["template"]


def container_lines(template: dict) -> list[str]:
    lines = []
    for c in template.get("spec", {}).get("containers", []):
        argv = [*c.get("command", []), *c.get("args", [])]
        if argv:
            lines.append(shlex.join(argv))
    return lines


@functools.cache
def command_lines() -> dict[str, list[str]]:
    """Every command line in cluster/, by file: entrypoints, container commands, launcher commands,
    compose commands, Dockerfile RUN steps."""
    found: dict[str, list[str]] = {}
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", MLFLOW / "mlflow-k8s.yaml"):
        lines = []
        for doc in load_docs(path):
            spec = doc.get("spec", {})
            if doc.get("kind") == "RayJob":
                lines.append(spec["entrypoint"])
                lines += container_lines(spec.get("submitterPodTemplate", {}))
                spec = spec["rayClusterSpec"]
            if doc.get("kind") in ("RayCluster", "RayJob"):
                for template in pod_templates(spec):
                    lines += container_lines(template)
            elif "template" in spec:
                lines += container_lines(spec["template"])
        found[path.name] = lines
    for path in LAUNCHER_FILES:
        config = load_one(path)
        sections = [config, *config["available_node_types"].values()]
        found[path.name] = [c for s in sections for k, v in s.items() if k.endswith("_commands") for c in v]
    compose = load_one(MLFLOW / "docker-compose.yaml")
    found["docker-compose.yaml"] = [
        c if isinstance(c, str) else shlex.join(c)
        for service in compose["services"].values()
        for key in ("entrypoint", "command")
        if (c := service.get(key))
    ]
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found["Dockerfile"] = [m.group(1) for m in re.finditer(r"^RUN\s+(.*)$", text, re.M)]
    return found


def flexkd_calls(lines: list[str]) -> list[list[str]]:
    return [
        argv for line in lines for words in shell_commands(line) if (argv := flexkd_argv(words)) is not None
    ]


def test_shell_commands_opens_bash_c_and_drops_redirections():
    line = (
        "bash -c 'set -e; cd /x; test -d /t || flexkd show demo >/dev/null 2>&1; flexkd sweep quickstart a=1'"
    )
    assert shell_commands(line) == [
        ["set", "-e"],
        ["cd", "/x"],
        ["test", "-d", "/t"],
        ["flexkd", "show", "demo"],
        ["flexkd", "sweep", "quickstart", "a=1"],
    ]
    assert flexkd_argv(
        ["ray", "job", "submit", "--address", "http://h:8265", "--", "flexkd", "train", "demo"]
    ) == ["train", "demo"]
    assert flexkd_argv(["python", "-m", "tuning.cli", "sweep", "quickstart"]) == ["sweep", "quickstart"]
    assert flexkd_argv(["pip", "install", "flexkd"]) is None
    assert flexkd_argv(["mkdir", "-p", "/mnt/flexkd"]) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["swep", "quickstart"],  # no such subcommand
        ["sweep", "no-such-sweep"],  # not shipped
        ["train", "no-such-preset"],
        ["sweep", "quickstart", "scaling.num_worker=1"],  # unknown run key
        ["sweep", "quickstart", "storage_path=relative/dir"],  # sweep field with a bad value
        ["train", "demo", "run.device=gpu"],  # bad value
        ["train", "demo", "--no-such-flag"],
    ],
)
def test_check_flexkd_rejects_bad_commands(argv):
    with pytest.raises((AssertionError, ConfigError, pytest.fail.Exception)):
        check_flexkd(argv)


def test_check_flexkd_accepts_shell_variables_in_values():
    check_flexkd(["sweep", "quickstart", "storage_path=$STORAGE", "scaling.storage_path=${STORAGE}/ray"])


COMMAND_SOURCES = [
    "raycluster.yaml",
    "rayjob.yaml",
    "mlflow-k8s.yaml",
    "aws.yaml",
    "gcp.yaml",
    "docker-compose.yaml",
    "Dockerfile",
]


def test_command_lines_come_from_every_source():
    assert sorted(command_lines()) == sorted(COMMAND_SOURCES)


@pytest.mark.parametrize("name", COMMAND_SOURCES)
def test_every_flexkd_command_is_valid(name):
    for argv in flexkd_calls(command_lines()[name]):
        check_flexkd(argv)


def test_the_rayjob_runs_a_shipped_sweep_on_gpus():
    calls = flexkd_calls(command_lines()["rayjob.yaml"])
    sweeps = [argv for argv in calls if argv[0] == "sweep"]
    assert len(sweeps) == 1
    argv = sweeps[0]
    assert argv[1] in sweep_names()
    for override in ("scaling.use_gpu=true", "run.device=cuda"):
        assert override in argv
    workers = [a for a in argv if a.startswith("scaling.num_workers=")]
    assert workers and int(workers[-1].split("=")[1]) >= 1


# ---------------------------------------------------------------------------------------------------------
# KubeRay


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"], "the head pod has no container"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head service must not be public"
    assert not head.get("enableIngress", False), "no Ingress for the dashboard: port-forward it"
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any(gpu_limit(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu in its limits"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    # KubeRay rejects token auth without a rayVersion of at least 2.52.0.
    assert version_tuple(spec["rayVersion"]) >= (2, 52, 0)


def test_raycluster_has_the_fields_of_its_kind():
    doc = load_one(KUBERAY / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    check_ray_cluster_spec(doc["spec"])


def test_rayjob_has_the_fields_of_its_kind():
    doc = load_one(KUBERAY / "rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_embeds_the_raycluster_spec():
    cluster = load_one(KUBERAY / "raycluster.yaml")["spec"]
    assert load_one(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"] == cluster


def shared_mounts(spec: dict) -> set[tuple[str, str]]:
    """(claim name, mount path) of every PVC mounted in every Ray pod; one pair means they all share it."""
    pairs = set()
    for template in pod_templates(spec):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        mounts = {
            (claims[m["name"]], m["mountPath"])
            for c in template["spec"]["containers"]
            for m in c.get("volumeMounts", [])
            if m["name"] in claims
        }
        assert mounts, "a Ray pod without the shared volume"
        pairs |= mounts
    return pairs


def test_ray_pods_share_one_readwritemany_volume_that_holds_the_sweep_storage():
    pvcs = {
        d["metadata"]["name"]: d
        for d in load_docs(KUBERAY / "pvc.yaml")
        if d["kind"] == "PersistentVolumeClaim"
    }
    job = load_one(KUBERAY / "rayjob.yaml")["spec"]
    for spec in (load_one(KUBERAY / "raycluster.yaml")["spec"], job["rayClusterSpec"]):
        ((claim, path),) = shared_mounts(spec)
        assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"]
    storage = [
        a.split("=", 1)[1]
        for argv in flexkd_calls([job["entrypoint"]])
        for a in argv
        if a.startswith(("storage_path=", "scaling.storage_path="))
    ]
    assert storage, "the RayJob sets no storage_path"
    assert all(s == path or s.startswith(path + "/") for s in storage), (storage, path)


def test_ray_pods_read_mlflow_settings_from_the_example_secret():
    example = load_one(KUBERAY / "secret.example.yaml")
    assert example["kind"] == "Secret"
    keys = set(example["stringData"])
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"):
        doc = load_one(path)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                assert "MLFLOW_TRACKING_URI" in env
                for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    ref = env[name]["valueFrom"]["secretKeyRef"]
                    assert "value" not in env[name]
                    assert ref["name"] == example["metadata"]["name"] and ref["key"] in keys


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher


def ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # locates the package without importing Ray
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_matches_rays_schema_and_has_a_gpu_worker(path):
    import jsonschema  # a dependency of Ray

    config = load_one(path)
    jsonschema.validate(config, ray_schema())
    assert config["cluster_name"]
    assert config["provider"]["type"] in ("aws", "gcp")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}

    def has_gpu(node_type):
        return node_type["resources"].get("GPU", 0) >= 1 or bool(
            node_type["node_config"].get("guestAccelerators")
        )

    assert any(has_gpu(t) and t.get("max_workers", config["max_workers"]) >= 1 for t in workers.values())
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_starts_ray_with_token_auth_and_a_local_dashboard(path):
    config = load_one(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = []  # the VAR=value prefix of each `ray start`
        for words in (w for line in config[key] for w in shell_commands(line)):
            n = next((i for i, w in enumerate(words) if not re.fullmatch(r"[A-Za-z_]\w*=.*", w)), len(words))
            if words[n : n + 2] == ["ray", "start"]:
                starts.append(words[:n])
        assert starts, f"{key}: no `ray start`"
        assert all("RAY_AUTH_MODE=token" in env for env in starts), (
            f"{key}: `ray start` without RAY_AUTH_MODE=token"
        )
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head and "--dashboard-host=127.0.0.1" in head
    assert any(Path(remote).name == "auth_token" for remote in config["file_mounts"]), (
        "the token is not copied"
    )


# ---------------------------------------------------------------------------------------------------------
# Credentials: nothing literal anywhere under cluster/

SENSITIVE = re.compile(r"password|passwd|secret|token|credential|(access|private|api|auth)[_-]?key", re.I)
# Names of secrets, paths to token files, references: they point at a credential, they are not one.
REFERENCE = re.compile(r"(name|ref|path|file|mode)$", re.I)
INTERPOLATION = re.compile(r"\$\{[^}]*\}|\$\$?[A-Za-z_]\w*")


def is_placeholder(value) -> bool:
    if value is None or value == "" or not isinstance(value, str):
        return value in (None, "")
    return "REPLACE_ME" in value or INTERPOLATION.fullmatch(value.strip()) is not None


def is_sensitive(name: str) -> bool:
    # A path (a file_mounts key such as ~/.ray/auth_token) says where a credential lives, not what it is.
    return bool(SENSITIVE.search(name)) and not REFERENCE.search(name) and "/" not in name


def literal_credentials(node, where: str = "") -> list[str]:
    """Places in a parsed YAML tree where a credential-named key holds a literal value, or a URI embeds
    a literal password."""
    found = []
    if isinstance(node, dict):
        # Kubernetes env entries and GCE metadata items: {name|key: X, value: Y}
        label = node.get("name", node.get("key"))
        if (
            isinstance(label, str)
            and "value" in node
            and is_sensitive(label)
            and not is_placeholder(node["value"])
        ):
            found.append(f"{where}.{label}")
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                found += literal_credentials(value, f"{where}.{key}")
            elif key != "value" and is_sensitive(str(key)) and not is_placeholder(value):
                found.append(f"{where}.{key}")
            elif isinstance(value, str):
                found += literal_credentials(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_credentials(item, f"{where}[{i}]")
    elif isinstance(node, str):
        if re.fullmatch(r"[A-Za-z_]\w*=.*", node, re.S):  # compose `environment: [KEY=value]`
            key, value = node.split("=", 1)
            if is_sensitive(key) and not is_placeholder(value):
                found.append(f"{where}={key}")
        stripped = INTERPOLATION.sub("X", node)
        for userinfo in re.findall(r"[a-z][a-z0-9+.-]*://([^/\s@]+)@", stripped):
            password = userinfo.partition(":")[2]
            if password and password != "X" and "REPLACE_ME" not in password:
                found.append(f"{where} (password in a URI)")
    return found


def test_credential_scan_finds_literals_and_passes_references():
    bad = {
        "env": [{"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}],
        "stringData": {"auth_token": "abc123"},
        "services": {
            "db": {"environment": {"POSTGRES_PASSWORD": "pw"}},
            "s3": {"environment": ["MINIO_ROOT_PASSWORD=pw", "MINIO_ROOT_USER=admin"]},
        },
        "uri": "postgresql://mlflow:pw@db:5432/mlflow",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
    }
    assert len(literal_credentials(bad)) == 6
    good = {
        "env": [
            {
                "name": "MLFLOW_TRACKING_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "MLFLOW_TRACKING_PASSWORD"}},
            },
            {"name": "RAY_AUTH_TOKEN_PATH", "value": "/etc/ray/token"},
        ],
        "stringData": {"MLFLOW_TRACKING_PASSWORD": "REPLACE_ME"},
        "authOptions": {"secretName": "flexkd-token"},
        "environment": {
            "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}",
            "X": ["A_TOKEN=$$A_TOKEN"],
        },
        "uri": "postgresql+psycopg2://mlflow:${POSTGRES_PASSWORD:?set it}@postgres:5432/mlflow",
    }
    assert literal_credentials(good) == []


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_literal_credentials_in_yaml(path):
    assert literal_credentials(load_docs(path), path.name) == []


def test_no_literal_credentials_in_the_ini_and_the_dockerfile():
    ini = configparser.ConfigParser()
    ini.read(MLFLOW / "basic_auth.ini")
    assert [k for k, v in ini["mlflow"].items() if is_sensitive(k) and not is_placeholder(v)] == []
    for m in re.finditer(r"^(?:ENV|ARG)\s+(\w+)[= ](.*)$", DOCKERFILE.read_text(), re.M):
        assert not (is_sensitive(m.group(1)) and not is_placeholder(m.group(2).strip('"'))), m.group(0)


# ---------------------------------------------------------------------------------------------------------
# MLflow server: compose, basic auth, Kubernetes


def test_compose_publishes_ports_on_localhost_only():
    services = load_one(MLFLOW / "docker-compose.yaml")["services"]
    published = []
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
            published.append(name)
    assert "mlflow" in published


def test_compose_runs_mlflow_with_basic_auth_served_artifacts_and_required_secrets():
    compose = load_one(MLFLOW / "docker-compose.yaml")
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--app-name=basic-auth" in command and "--serve-artifacts" in command
    assert "postgres" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert (
        "flask-wtf" in mlflow["build"]["dockerfile_inline"].lower()
        or "mlflow[auth]" in mlflow["build"]["dockerfile_inline"]
    )
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if is_sensitive(key):  # a secret must be given, never defaulted: ${VAR:?message}
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), f"{key}: {value}"
    for key in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert key in mlflow["environment"]
    config_path = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert any(v.split(":")[:2] == ["./basic_auth.ini", config_path] for v in mlflow["volumes"])


def test_basic_auth_ini_uses_only_mlflows_keys_and_an_absolute_user_store():
    # The ini MLflow ships, found without importing MLflow (slow, and its auth app needs Flask-WTF).
    shipped = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth" / "basic_auth.ini"
    known = set(re.findall(r"^#?\s*(\w+)\s*=", shipped.read_text(), re.M))
    ini = configparser.ConfigParser()
    ini.read(MLFLOW / "basic_auth.ini")
    assert set(ini["mlflow"]) <= known, set(ini["mlflow"]) - known
    assert "admin_password" not in ini["mlflow"]
    db = ini["mlflow"]["database_uri"]
    assert db.startswith("sqlite:////"), "a relative SQLite path lands in the server's working directory"
    store_dir = str(Path(db.removeprefix("sqlite:///")).parent)
    compose_volumes = load_one(MLFLOW / "docker-compose.yaml")["services"]["mlflow"]["volumes"]
    assert any(v.split(":")[1] == store_dir for v in compose_volumes), "the user store is not on a volume"
    deployment = next(d for d in load_docs(MLFLOW / "mlflow-k8s.yaml") if d["kind"] == "Deployment")
    mounts = [
        m["mountPath"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        for m in c["volumeMounts"]
    ]
    assert store_dir in mounts


def test_mlflow_k8s_is_a_deployment_behind_a_clusterip_service_with_secrets_from_a_secret():
    docs = {d["kind"]: d for d in load_docs(MLFLOW / "mlflow-k8s.yaml")}
    assert {"Deployment", "Service"} <= set(docs)
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in container["command"] and "--serve-artifacts" in container["command"]
    env = {e["name"]: e for e in container["env"]}
    for name in (
        "MLFLOW_BACKEND_STORE_URI",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        assert "secretKeyRef" in env[name]["valueFrom"], name


def test_nothing_under_cluster_is_exposed_publicly():
    for path in YAML_FILES:
        for doc in load_docs(path):
            assert doc.get("kind") != "Ingress", path
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path


# ---------------------------------------------------------------------------------------------------------
# One Ray version everywhere


def test_one_ray_version_in_the_image_the_manifests_and_the_launcher():
    (image,) = re.findall(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", DOCKERFILE.read_text(), re.M)
    versions = {"Dockerfile": image}
    versions["raycluster.yaml"] = load_one(KUBERAY / "raycluster.yaml")["spec"]["rayVersion"]
    versions["rayjob.yaml"] = load_one(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]
    for path in LAUNCHER_FILES:
        config = load_one(path)
        versions[path.name] = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-", config["docker"]["image"]).group(1)
        pins = re.findall(r"ray\[[\w,]+\]==(\d+\.\d+\.\d+)", " ".join(config["setup_commands"]))
        assert pins, f"{path.name}: setup_commands do not pin ray"
        versions.update({f"{path.name} setup": v for v in pins})
    assert len(set(versions.values())) == 1, versions
