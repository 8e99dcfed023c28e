"""Deployment files: validated offline, then checked for what they must mean.

No container engine or Kubernetes API runs here, so validity is checked with
offline tools: hadolint (Dockerfile), the Compose specification's JSON schema
through check-jsonschema (docker-compose.yml), kubernetes-validate's bundled
OpenAPI schemas in strict mode (every core manifest, on the oldest and newest
Kubernetes it knows), shellcheck (the configure job). Each validator is also
shown to reject a broken copy, so a pass is not vacuous. The rest are the
properties a working cluster depends on: shared cluster file and secret, one
FoundationDB version everywhere, probes on the right paths, drain timing,
selectors that select, and the config the pods get loading in Rookery itself.
The two helper scripts run for real: the health check against a live node,
the configure job against a stand-in fdbcli.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate import utils as kv_utils

from helpers import NodeProcess
from server import config as configmod

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKER_DIR = ROOT / "deploy" / "docker"
IMAGE_TOML = DOCKER_DIR / "rookery.toml"
HEALTHCHECK = DOCKER_DIR / "healthcheck.py"
CONFIGURE_DB = DOCKER_DIR / "configure-db.sh"
COMPOSE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent

#: The peer channel's options, named ahead of its code (ROOKERY_CLUSTER_*).
#: Until the schema has a [cluster] section they are the only ROOKERY_*
#: variables allowed that the schema does not know.
CLUSTER_OPTIONS = {
    "ROOKERY_CLUSTER_PEERS", "ROOKERY_CLUSTER_DNS", "ROOKERY_CLUSTER_ADVERTISE", "ROOKERY_CLUSTER_SECRET",
}
CLIENT_LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps", "http")
MAIL_PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "imap": 143, "imaps": 993}


# -- helpers ---------------------------------------------------------------------

def tool(name: str) -> str:
    """A validator's executable from the test virtualenv (pyproject's test extra)."""
    path = BIN / name
    assert path.exists(), f"{name} missing: pip install -e '.[test]'"
    return str(path)


def run(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        present = name in env and (env[name] != "" or op in ("-", "?"))
        if op in (":-", "-"):
            return env[name] if present else arg
        if op in (":?", "?"):
            if not present:
                raise KeyError(f"{name}: {arg}")
            return env[name]
        return env.get(name, "")

    return _VAR.sub(sub, value)


def env_dict(environment: Any) -> dict[str, str]:
    """A compose ``environment`` (mapping or list) as a dict of strings."""
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in (environment or {}).items()}


def schema_envs() -> set[str]:
    return {opt.env for opt in configmod.SCHEMA}


def check_rookery_env_names(names: set[str]) -> None:
    """Every ROOKERY_* name is a real option (the peer channel's may be pending)."""
    known = schema_envs()
    has_cluster_section = any(opt.section == "cluster" for opt in configmod.SCHEMA)
    for name in names:
        if not name.startswith("ROOKERY_"):
            continue
        if name in CLUSTER_OPTIONS and not has_cluster_section:
            continue
        assert name in known, f"{name} is not a Rookery option (see `rookery config`)"


def load_config(path: Path | None, env: Mapping[str, str]) -> configmod.Config:
    """Rookery's own loader, minus the peer options it may not know yet."""
    known = schema_envs()
    return configmod.load(path, environ={k: v for k, v in env.items() if k in known})


# -- fixtures --------------------------------------------------------------------

@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE), build_args={})


@pytest.fixture(scope="module")
def fdb_version(dockerfile: DockerfileParser) -> str:
    for item in dockerfile.structure:
        if item["instruction"] == "ARG" and item["value"].startswith("FDB_VERSION="):
            return str(item["value"].split("=", 1)[1])
    raise AssertionError("deploy/Dockerfile has no ARG FDB_VERSION=<default>")


@pytest.fixture(scope="module")
def image_config() -> configmod.Config:
    return load_config(IMAGE_TOML, {})


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    with open(COMPOSE) as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose(compose_raw: dict[str, Any]) -> dict[str, Any]:
    """The compose file as Compose resolves it, with the variables it requires set."""
    return interpolate(compose_raw, {"ROOKERY_CLUSTER_SECRET": "test-secret"})


@pytest.fixture(scope="module")
def rookery_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == "deploy/Dockerfile"
    }


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S_DIR.glob("*.yaml")):
        with open(path) as fh:
            for doc in yaml.safe_load_all(fh):
                if doc:
                    yield path, doc


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path, doc in k8s_documents():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in found, f"{path.name}: {key} defined twice"
        found[key] = doc
    return found


def only(k8s: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    docs = [doc for (k, _), doc in k8s.items() if k == kind]
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def deployment(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return only(k8s, "Deployment")


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["template"]["spec"])


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (main,) = [c for c in pod["containers"] if c["name"] == "rookery"]
    return dict(main)


@pytest.fixture(scope="module")
def node_config_path(container: dict[str, Any]) -> str:
    args = container["args"]
    assert args[0] == "serve" and "--config" in args, args
    return str(args[args.index("--config") + 1])


@pytest.fixture(scope="module")
def k8s_config(
    tmp_path_factory: pytest.TempPathFactory,
    k8s: dict[tuple[str, str], dict[str, Any]],
    pod: dict[str, Any],
    container: dict[str, Any],
    node_config_path: str,
) -> configmod.Config:
    """The config file the pods read, loaded by Rookery's loader with the pod's env."""
    mount = next(m for m in container["volumeMounts"] if node_config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = k8s[("ConfigMap", volume["configMap"]["name"])]
    key = node_config_path[len(mount["mountPath"]) + 1 :]
    path = tmp_path_factory.mktemp("k8s") / key
    path.write_text(configmap["data"][key])
    env = {e["name"]: e.get("value", "") for e in container.get("env", []) if "value" in e}
    return load_config(path, env)


# -- Dockerfile ------------------------------------------------------------------

def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER 10001:10001\nRUN cd /tmp && ls"))
    assert run(tool("hadolint"), "--no-color", str(broken)).returncode != 0, "hadolint accepted a known-bad Dockerfile"


def test_dockerfile_slim_non_root_with_fdb_client(dockerfile: DockerfileParser, fdb_version: str) -> None:
    structure = dockerfile.structure
    froms = [i for i, item in enumerate(structure) if item["instruction"] == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected: build tools stay out of the runtime image"
    final = structure[froms[-1] :]
    assert all("slim" in image for image in dockerfile.parent_images), dockerfile.parent_images

    users = [item["value"] for item in final if item["instruction"] == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric non-root uid wanted (runAsNonRoot checks it)"
    last_user = max(i for i, item in enumerate(final) if item["instruction"] == "USER")
    after = [item for item in final[last_user:] if item["instruction"] == "RUN"]
    assert not after, "RUN after USER would run as the node user"

    runs = "\n".join(item["value"] for item in structure if item["instruction"] == "RUN")
    release = "https://github.com/apple/foundationdb/releases/download/${FDB_VERSION}"
    assert f"{release}/foundationdb-clients_${{FDB_VERSION}}" in runs
    assert '"foundationdb==${FDB_VERSION}"' in runs, "the binding must match libfdb_c (its header version is checked)"
    assert "curl" not in runs and "wget" not in runs, "slim image: fetch with Python"
    assert re.fullmatch(r"\d+\.\d+\.\d+", fdb_version), fdb_version

    for item in structure:
        if item["instruction"] == "COPY" and not item["value"].startswith("--from="):
            for src in item["value"].split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the build context (repository root)"


def test_dockerfile_runs_node_with_image_config_and_health_check(
    dockerfile: DockerfileParser, image_config: configmod.Config
) -> None:
    by_kind: dict[str, list[str]] = {}
    for item in dockerfile.structure:
        by_kind.setdefault(item["instruction"], []).append(item["value"])
    cmd = yaml.safe_load(by_kind["CMD"][-1])
    entry = yaml.safe_load(by_kind["ENTRYPOINT"][-1])
    assert entry == ["rookery"] and cmd[0] == "serve", (entry, cmd)
    config_path = cmd[cmd.index("--config") + 1]
    copied = f"deploy/docker/rookery.toml {config_path}"
    assert copied in by_kind["COPY"], "the CMD's config file must be the one copied in"

    health = by_kind["HEALTHCHECK"][-1]
    assert "CMD" in health and "healthcheck.py" in health and config_path in health, health
    assert "deploy/docker/healthcheck.py /usr/local/lib/rookery/healthcheck.py" in by_kind["COPY"]
    assert "/usr/local/lib/rookery/healthcheck.py" in health
    assert "curl" not in health and "wget" not in health

    exposed = {int(p.split("/")[0]) for p in " ".join(by_kind["EXPOSE"]).split()}
    listening = {port_of(addr) for _, addr in image_config.listen.items() if addr}
    assert exposed == listening, f"EXPOSE {sorted(exposed)} vs listeners {sorted(listening)}"
    assert all(port >= 1024 for port in listening), "a non-root node cannot bind ports below 1024"
    assert image_config.store.backend == "embedded", "alone, the image runs on the embedded store"
    assert str(image_config.data_dir) == "/var/lib/rookery"


# -- the image's config, served for real ------------------------------------------

def image_env(tmp_path: Path, image_config: configmod.Config, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ROOKERY_")}
    clean.update(ROOKERY_SERVER_DATA_DIR=str(tmp_path / "data"), ROOKERY_SERVER_HOSTNAME="mx.test",
                 ROOKERY_SERVER_SHUTDOWN_TIMEOUT="2")
    for name, address in image_config.listen.items():
        if address:
            clean[f"ROOKERY_LISTEN_{name.upper()}"] = "127.0.0.1:0"
    clean.update(env)
    return clean


def serve_image_config(tmp_path: Path, image_config: configmod.Config, **env: str) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    """``rookery serve --config deploy/docker/rookery.toml`` as the image runs
    it, with only ``ROOKERY_*`` variables moving its data directory to
    ``tmp_path`` and its listeners (every one the file turns on) to loopback."""
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--config", str(IMAGE_TOML)],
            cwd=ROOT, env=image_env(tmp_path, image_config, **env), stdout=subprocess.DEVNULL, stderr=out,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"node ready .*ports=(\S+)", log.read_text(errors="replace"))
        if m:
            return proc, {k: int(v) for k, v in (i.split("=") for i in m.group(1).split(","))}, log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    raise AssertionError(f"rookery serve with the image's config never got ready:\n{log.read_text(errors='replace')}")


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_image_config_serves_as_one_node(tmp_path: Path, image_config: configmod.Config) -> None:
    proc, ports, log = serve_image_config(tmp_path, image_config)
    try:
        assert http_status(ports["http"], "/healthz/ready") == 200
        enabled = {name for name, address in image_config.listen.items() if address}
        assert set(ports) == enabled and "cluster" not in ports, ports
        assert (tmp_path / "data").is_dir(), "the data directory comes from ROOKERY_SERVER_DATA_DIR"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    assert code == 0, log.read_text(errors="replace")


def test_image_config_with_the_cluster_turned_on_by_env(tmp_path: Path, image_config: configmod.Config) -> None:
    """What docker-compose.yml adds: the listener and its secret."""
    proc, ports, log = serve_image_config(
        tmp_path, image_config, ROOKERY_LISTEN_CLUSTER="127.0.0.1:0", ROOKERY_CLUSTER_SECRET="s3cret",
    )
    try:
        assert "cluster" in ports and http_status(ports["http"], "/healthz/ready") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text(errors="replace")
    # Without the secret the listener is refused with a config error, not a traceback.
    result = run(
        sys.executable, "-m", "server.cli", "serve", "--config", str(IMAGE_TOML), cwd=ROOT,
        env=image_env(tmp_path, image_config, ROOKERY_LISTEN_CLUSTER="127.0.0.1:0"),
    )
    assert result.returncode == 2 and "[cluster] secret" in result.stderr and "Traceback" not in result.stderr


# -- helper scripts --------------------------------------------------------------

def load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("rookery_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_address_rules(tmp_path: Path) -> None:
    hc = load_healthcheck()
    assert hc.url_for("0.0.0.0:8080") == "http://127.0.0.1:8080/healthz/ready"
    assert hc.url_for("[::]:8080") == "http://[::1]:8080/healthz/ready"
    assert hc.url_for("10.1.2.3:9000") == "http://10.1.2.3:9000/healthz/ready"
    with pytest.raises(ValueError):
        hc.url_for("8080")
    assert hc.http_address(str(IMAGE_TOML), {}) == "0.0.0.0:8080"
    env = {"ROOKERY_LISTEN_HTTP": "127.0.0.1:9"}
    assert hc.http_address(str(IMAGE_TOML), env) == "127.0.0.1:9", "env wins, as in rookery"


def test_healthcheck_against_a_live_node(tmp_path: Path, node_processes: list[NodeProcess]) -> None:
    node = NodeProcess(tmp_path / "data", ("http",))
    node_processes.append(node)
    env = dict(os.environ, ROOKERY_LISTEN_HTTP=f"127.0.0.1:{node.ports['http']}")
    ok = run(sys.executable, str(HEALTHCHECK), "--config", str(IMAGE_TOML), env=env)
    assert ok.returncode == 0, ok.stderr

    node.terminate()
    down = run(sys.executable, str(HEALTHCHECK), "--config", str(IMAGE_TOML), "--timeout", "2", env=env)
    assert down.returncode == 1 and "unhealthy" in down.stderr
    off = run(sys.executable, str(HEALTHCHECK), env=dict(os.environ, ROOKERY_LISTEN_HTTP=""))
    assert off.returncode == 1 and "no [listen] http" in off.stderr


def test_configure_script_passes_shellcheck() -> None:
    result = run(tool("shellcheck"), "--shell=sh", str(CONFIGURE_DB))
    assert result.returncode == 0, result.stdout


FAKE_FDBCLI = """#!/bin/sh
# Stand-in fdbcli: answers from $FAKE_DIR, counting calls per command.
cmd=""
while [ $# -gt 0 ]; do
    case "$1" in --exec) cmd="$2"; shift ;; esac
    shift
done
echo "$cmd" >> "$FAKE_DIR/calls"
case "$cmd" in
    "configure new "*) kind=configure ;;
    "status minimal") kind=status ;;
    *) echo "unexpected command: $cmd" >&2; exit 2 ;;
esac
n=$(grep -c "" "$FAKE_DIR/calls")
script="$FAKE_DIR/$kind"
# Each line of the script file: "<exit code> <output>"; the last line repeats.
line=$(sed -n "${n}p" "$script"); [ -n "$line" ] || line=$(tail -n 1 "$script")
echo "${line#* }"
exit "${line%% *}"
"""


def run_configure(
    tmp_path: Path, configure: list[str], status: list[str], cluster_file: bool = True
) -> tuple[int, list[str], str]:
    fake = tmp_path / "fake"
    fake.mkdir()
    fdbcli = fake / "fdbcli"
    fdbcli.write_text(FAKE_FDBCLI)
    fdbcli.chmod(fdbcli.stat().st_mode | stat.S_IXUSR)
    (fake / "configure").write_text("\n".join(configure) + "\n")
    # The fake numbers lines by call overall: line N answers the Nth fdbcli call.
    (fake / "status").write_text("\n".join(status) + "\n")
    cf = tmp_path / "fdb.cluster"
    if cluster_file:
        cf.write_text("docker:docker@127.0.0.1:4500\n")
    env = dict(
        os.environ,
        PATH=f"{fake}:{os.environ['PATH']}",
        FAKE_DIR=str(fake),
        FDB_CLUSTER_FILE=str(cf),
        FDB_CONFIGURE_ATTEMPTS="4",
        FDB_CONFIGURE_DELAY="0",
    )
    result = run("sh", str(CONFIGURE_DB), env=env)
    calls_file = fake / "calls"
    calls = calls_file.read_text().splitlines() if calls_file.exists() else []
    return result.returncode, calls, result.stderr


def test_configure_creates_the_database(tmp_path: Path) -> None:
    rc, calls, err = run_configure(tmp_path, ["0 Database created"], ["0 The database is available."])
    assert rc == 0, err
    assert calls == ["configure new single ssd", "status minimal"]


def test_configure_is_idempotent(tmp_path: Path) -> None:
    already = "1 ERROR: Database already exists! To change configuration, don't say `new'"
    rc, calls, err = run_configure(tmp_path, [already], ["1 x", "0 The database is available."])
    assert rc == 0, err
    assert calls[0] == "configure new single ssd" and "already exists" in err


def test_configure_retries_until_the_server_answers(tmp_path: Path) -> None:
    unavailable = "1 ERROR: The database is unavailable"
    # calls 1-2 fail, call 3 creates; status is asked on call 4 (line 4 of its file)
    rc, calls, err = run_configure(
        tmp_path,
        [unavailable, unavailable, "0 Database created"],
        ["1 x", "1 x", "1 x", "1 The database is unavailable; type `status' for more information.",
         "0 The database is available."],
    )
    assert rc == 0, err
    assert calls == ["configure new single ssd"] * 3 + ["status minimal"] * 2


def test_configure_gives_up(tmp_path: Path) -> None:
    rc, calls, err = run_configure(tmp_path, ["1 ERROR: The database is unavailable"], ["0 x"])
    assert rc == 1 and "giving up" in err
    assert calls == ["configure new single ssd"] * 4


def test_configure_waits_for_the_cluster_file(tmp_path: Path) -> None:
    rc, calls, err = run_configure(
        tmp_path, ["0 Database created"], ["0 The database is available."], cluster_file=False
    )
    assert rc == 1 and "cluster file" in err and calls == []


# -- docker-compose.yml ----------------------------------------------------------

def test_compose_matches_the_compose_specification(tmp_path: Path, compose_raw: dict[str, Any]) -> None:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = run(*cmd, str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = copy.deepcopy(compose_raw)
    broken["services"]["rookery1"]["stop_grace_periodd"] = "30s"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    assert run(*cmd, str(bad)).returncode != 0, "the compose schema accepted an unknown key"


def test_compose_services(
    compose: dict[str, Any], rookery_services: dict[str, dict[str, Any]], fdb_version: str
) -> None:
    services = compose["services"]
    assert len(rookery_services) == 3, sorted(rookery_services)
    assert set(services) == {"fdb", "fdb-configure", *rookery_services}

    fdb, job = services["fdb"], services["fdb-configure"]
    assert fdb["image"] == job["image"] == f"foundationdb/foundationdb:{fdb_version}"
    assert job["depends_on"]["fdb"]["condition"] == "service_started"
    assert job.get("restart") == "no", "a one-shot job must not be restarted once it succeeded"
    assert "/configure-db.sh" in " ".join(job["entrypoint"])
    script_mounts = [v for v in job["volumes"] if v.startswith("./deploy/docker/configure-db.sh:")]
    assert script_mounts and (ROOT / "deploy/docker/configure-db.sh").exists()
    assert env_dict(job["environment"])["FDB_CONFIGURATION"] == "single ssd"

    for name, svc in rookery_services.items():
        assert svc["build"]["context"] == "."
        assert svc["build"]["args"]["FDB_VERSION"] == fdb_version, name
        assert svc["depends_on"]["fdb-configure"]["condition"] == "service_completed_successfully", name
        assert svc.get("hostname") == name


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """volume name -> mount path, for named volumes."""
    found = {}
    for item in svc.get("volumes", []):
        source, target = item.split(":")[:2]
        if not source.startswith((".", "/")):
            found[source] = target
    return found


def image_cmd(dockerfile: DockerfileParser) -> list[str]:
    cmd = [item["value"] for item in dockerfile.structure if item["instruction"] == "CMD"][-1]
    return list(yaml.safe_load(cmd))


def test_compose_nodes_share_cluster_file_and_secret(
    compose: dict[str, Any], rookery_services: dict[str, dict[str, Any]], image_config: configmod.Config,
    dockerfile: DockerfileParser,
) -> None:
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    for svc in services.values():
        assert set(mounts(svc)) <= declared, "named volumes must be declared at the top level"

    fdb_env = env_dict(services["fdb"]["environment"])
    shared = next(
        v for v, path in mounts(services["fdb"]).items() if fdb_env["FDB_CLUSTER_FILE"] == f"{path}/fdb.cluster"
    )
    job_env = env_dict(services["fdb-configure"]["environment"])
    assert job_env["FDB_CLUSTER_FILE"] == f"{mounts(services['fdb-configure'])[shared]}/fdb.cluster"

    secrets = set()
    for name, svc in rookery_services.items():
        env = env_dict(svc["environment"])
        check_rookery_env_names(set(env))
        assert shared in mounts(svc), f"{name} does not mount the cluster file volume {shared}"
        cfg = load_config(IMAGE_TOML, env)
        assert cfg.listen.cluster and cfg.cluster.secret, f"{name}: the peer channel needs a listener and the secret"
        cluster_port = port_of(cfg.listen.cluster)
        assert cfg.store.backend == "foundationdb", name
        # The client rewrites its cluster file: the node gets a writable copy
        # of the shared one, in its data directory (the Dockerfile gives it
        # to the node's user), made by the entrypoint before the image's CMD.
        source = f"{mounts(svc)[shared]}/fdb.cluster"
        assert f"{shared}:{mounts(svc)[shared]}:ro" in svc["volumes"], f"{name}: the shared file is read, not written"
        copy_path = cfg.store.cluster_file
        assert copy_path.startswith(f"{image_config.data_dir}/"), f"{name}: {copy_path} is not writable by the node"
        assert not any(copy_path.startswith(f"{path}/") for path in mounts(svc).values()), name
        entry = svc["entrypoint"]
        assert entry[:2] == ["/bin/sh", "-c"] and f'cp {source} "$ROOKERY_STORE_CLUSTER_FILE"' in entry[2], name
        assert 'exec rookery "$@"' in entry[2], name
        assert svc["command"] == image_cmd(dockerfile), f"{name} must run what the image runs"
        secrets.add(env["ROOKERY_CLUSTER_SECRET"])
        peers = {p.strip() for p in env["ROOKERY_CLUSTER_PEERS"].split(",")}
        assert peers == {f"{n}:{cluster_port}" for n in rookery_services}, name
        grace = float(svc["stop_grace_period"].removesuffix("s"))
        assert grace > cfg.server.shutdown_timeout, f"{name}: stop_grace_period must exceed shutdown_timeout"
    assert secrets == {"test-secret"}, "all nodes must share the one cluster secret"


def test_compose_entrypoint_copies_the_cluster_file_and_runs_the_node(
    tmp_path: Path, rookery_services: dict[str, dict[str, Any]]
) -> None:
    """The entrypoint script run by a real ``sh``, its paths moved under
    ``tmp_path`` and ``rookery`` a stand-in that reports what it got."""
    svc = next(iter(rookery_services.values()))
    shared_dir = mounts(svc)["fdb-config"]
    source = tmp_path / "shared"
    source.mkdir()
    (source / "fdb.cluster").write_text("docker:docker@10.0.0.2:4500\n")
    source.chmod(0o555)  # mounted read-only
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "rookery").write_text('#!/bin/sh\necho "args: $*"\ncat "$ROOKERY_STORE_CLUSTER_FILE"\n')
    (fake / "rookery").chmod(0o755)
    copy_path = tmp_path / "data" / "fdb.cluster"
    copy_path.parent.mkdir()
    sh, flag, script, arg0 = svc["entrypoint"]
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", ROOKERY_STORE_CLUSTER_FILE=str(copy_path))
    result = run(sh, flag, script.replace(shared_dir, str(source)), arg0, *svc["command"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"args: {' '.join(svc['command'])}", "docker:docker@10.0.0.2:4500"]
    copy_path.write_text("rewritten by the client\n")  # the copy is writable
    # No shared file (yet): the node does not start on nothing.
    source.chmod(0o755)
    (source / "fdb.cluster").unlink()
    failed = run(sh, flag, script.replace(shared_dir, str(source)), arg0, *svc["command"], env=env)
    assert failed.returncode != 0 and "args:" not in failed.stdout


def test_compose_secret_is_required(compose_raw: dict[str, Any]) -> None:
    with pytest.raises(KeyError, match="ROOKERY_CLUSTER_SECRET"):
        interpolate(compose_raw, {})


def test_compose_ports(rookery_services: dict[str, dict[str, Any]], image_config: configmod.Config) -> None:
    wanted = {port_of(getattr(image_config.listen, name)) for name in CLIENT_LISTENERS}
    host_ports: list[int] = []
    for name, svc in rookery_services.items():
        mapped = {}
        for item in svc["ports"]:
            host, container = str(item).rsplit(":", 1)
            mapped[int(container)] = int(host.rpartition(":")[2])
        assert set(mapped) == wanted, f"{name} maps {sorted(mapped)}, listeners are {sorted(wanted)}"
        host_ports += mapped.values()
    assert len(host_ports) == len(set(host_ports)), f"host ports collide: {sorted(host_ports)}"


# -- Kubernetes ------------------------------------------------------------------

def test_manifests_validate_against_kubernetes_schemas() -> None:
    versions = kv_utils.all_versions()
    oldest, newest = versions[0], versions[-1]
    kinds = set()
    for path, doc in k8s_documents():
        if doc["apiVersion"].startswith("apps.foundationdb.org/"):
            continue  # a custom resource: checked in test_foundationdb_cluster
        for version in (oldest, newest):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = f"{path.name} {doc['kind']}/{doc['metadata']['name']} on {version}"
                pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def test_kubernetes_validation_is_strict(deployment: dict[str, Any]) -> None:
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kv_utils.latest_version(), strict=True)


FDB_SPEC_FIELDS = {  # FoundationDBClusterSpec, apps.foundationdb.org/v1beta2 (operator docs/cluster_spec.md)
    "version", "databaseConfiguration", "processes", "processCounts", "seedConnectionString",
    "partialConnectionString", "faultDomain", "processGroupsToRemove", "processGroupsToRemoveWithoutExclusion",
    "configMap", "mainContainer", "sidecarContainer", "trustedCAs", "sidecarVariables", "logGroup", "dataCenter",
    "dataHall", "automationOptions", "processGroupIDPrefix", "lockOptions", "routing", "ignoreUpgradabilityChecks",
    "buggify", "storageServersPerPod", "logServersPerPod", "minimumUptimeSecondsForBounce",
    "replaceInstancesWhenResourcesChange", "skip", "coordinatorSelection", "labels", "useExplicitListenAddress",
    "imageType", "maxZonesWithUnavailablePods",
}
FDB_PROCESS_CLASSES = {"general", "storage", "log", "transaction", "stateless", "cluster_controller", "coordinator"}


def test_foundationdb_cluster(k8s: dict[tuple[str, str], dict[str, Any]], fdb_version: str) -> None:
    cluster = only(k8s, "FoundationDBCluster")
    assert cluster["apiVersion"] == "apps.foundationdb.org/v1beta2"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", cluster["metadata"]["name"])
    spec = cluster["spec"]
    assert set(spec) <= FDB_SPEC_FIELDS, f"unknown spec fields: {set(spec) - FDB_SPEC_FIELDS}"
    assert spec["version"] == fdb_version, "server and the image's client library must be the same version"
    db = spec["databaseConfiguration"]
    assert db["redundancy_mode"] in {"single", "double", "triple", "three_data_hall", "three_datacenter"}
    assert db["storage_engine"] in {"ssd", "ssd-2", "ssd-redwood-1", "ssd-rocksdb-v1", "ssd-sharded-rocksdb", "memory"}
    assert all(isinstance(n, int) for n in spec.get("processCounts", {}).values())
    assert set(spec.get("processes", {})) <= FDB_PROCESS_CLASSES
    # The core types embedded in the custom resource are checked as what they are.
    for settings in spec.get("processes", {}).values():
        if "podTemplate" in settings:
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                 "template": settings["podTemplate"]},
                kv_utils.latest_version(), strict=True,
            )
        if "volumeClaimTemplate" in settings:
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "t"},
                 **settings["volumeClaimTemplate"]},
                kv_utils.latest_version(), strict=True,
            )


def test_deployment_probes_and_drain(
    container: dict[str, Any], pod: dict[str, Any], k8s_config: configmod.Config
) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/healthz/ready" and live["path"] == "/healthz/live"
    for probe in (ready, live, container.get("startupProbe", {}).get("httpGet", ready)):
        port = ports.get(probe["port"], probe["port"])
        assert port == port_of(k8s_config.listen.http), "probes must hit the http listener"

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert "node drain" in " ".join(pre_stop)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > k8s_config.server.shutdown_timeout, "SIGKILL would cut the drain short"


def test_deployment_config_and_cluster_file(
    k8s: dict[tuple[str, str], dict[str, Any]],
    pod: dict[str, Any],
    container: dict[str, Any],
    node_config_path: str,
    k8s_config: configmod.Config,
) -> None:
    check_rookery_env_names({e["name"] for e in container.get("env", [])})
    assert k8s_config.store.backend == "foundationdb"
    mount_paths = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(k8s_config.data_dir) in mount_paths, "data_dir must be a writable volume"

    # Every listener is a named container port; the preStop speaks to the same config.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for name, address in k8s_config.listen.items():
        if address:
            assert ports.get(name) == port_of(address), f"container port {name!r} vs [listen] {name} = {address}"
    assert node_config_path in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])

    # The operator's ConfigMap -> init container copy -> [store] cluster_file.
    cluster = only(k8s, "FoundationDBCluster")
    volumes = {v["name"]: v for v in pod["volumes"]}
    operator_configmap = f"{cluster['metadata']['name']}-config"
    (fdb_volume,) = [v for v in volumes.values() if v.get("configMap", {}).get("name") == operator_configmap]
    (item,) = fdb_volume["configMap"]["items"]
    assert item["key"] == "cluster-file"
    (init,) = pod["initContainers"]
    assert init["image"] == container["image"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    src, dst = init["command"][-2:]
    assert src == f"{init_mounts[fdb_volume['name']]}/{item['path']}"
    assert dst == k8s_config.store.cluster_file
    shared = next(name for name, path in init_mounts.items() if dst.startswith(path + "/"))
    assert "emptyDir" in volumes[shared]
    main_mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert main_mounts[shared] == init_mounts[shared]


def test_deployment_security(pod: dict[str, Any], container: dict[str, Any], dockerfile: DockerfileParser) -> None:
    user = [item["value"] for item in dockerfile.structure if item["instruction"] == "USER"][-1]
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and str(ctx["runAsUser"]) == user.split(":")[0]
    for c in [container, *pod.get("initContainers", [])]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"], "the HPA's CPU utilisation needs a CPU request"


def test_cluster_secret(k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]) -> None:
    (env,) = [e for e in container["env"] if e["name"] == "ROOKERY_CLUSTER_SECRET"]
    ref = env["valueFrom"]["secretKeyRef"]
    secret = k8s[("Secret", ref["name"])]
    assert ref["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_services(
    k8s: dict[tuple[str, str], dict[str, Any]], deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports_by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    port_names = set(ports_by_name)
    services = {name: doc for (kind, name), doc in k8s.items() if kind == "Service"}
    for name, svc in services.items():
        assert selects(svc["spec"]["selector"], labels), f"Service {name} selects no Rookery pod"
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name}: no container port {port['targetPort']!r}"

    mail = [s for s in services.values() if s["spec"].get("type") == "LoadBalancer"]
    assert len(mail) == 1
    assert {p["targetPort"]: p["port"] for p in mail[0]["spec"]["ports"]} == MAIL_PORTS
    assert mail[0]["spec"]["externalTrafficPolicy"] == "Local", "keep client addresses for SMTP and login throttling"

    headless = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    peers = headless[0]
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert [p["targetPort"] for p in peers["spec"]["ports"]] == ["cluster"]
    env = {e["name"]: e for e in container["env"]}
    assert env["ROOKERY_CLUSTER_DNS"]["value"].split(".")[0] == peers["metadata"]["name"]
    # Pod names do not resolve in a Deployment: each node advertises its pod IP.
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["ROOKERY_CLUSTER_ADVERTISE"]["value"] == f"$(POD_IP):{ports_by_name['cluster']}"
    order = list(env)
    assert order.index("POD_IP") < order.index("ROOKERY_CLUSTER_ADVERTISE"), "$(POD_IP) expands only if defined earlier"


def test_disruption_budget_and_autoscaler(
    k8s: dict[tuple[str, str], dict[str, Any]], deployment: dict[str, Any]
) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = only(k8s, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)

    hpa = only(k8s, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    wanted = ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert (target["apiVersion"], target["kind"], target["name"]) == wanted
    assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a disruption must leave nodes serving"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; re-applying would reset it"


def test_readme_documents_deploying() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Deploying" in readme
    section = readme.split("## Deploying", 1)[1].split("\n## ", 1)[0]
    assert "docker compose up" in section and "ROOKERY_CLUSTER_SECRET" in section
    assert re.search(r"kubectl( -n \S+)? apply -f deploy/kubernetes/", section)
