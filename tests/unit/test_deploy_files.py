"""The container and deployment files, checked structurally (no Docker engine or cluster needed).

What is checked is what would break a deployment silently: a scaled agent that cannot start
twice (fixed name or host port), a probe on the wrong path, a dashboard querying a metric that
does not exist, a PodDisruptionBudget or ScaledObject that selects nothing.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from choreo.observability.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "kubernetes"
AGENTS = ("inventory", "payments", "shipping", "orders")
HTTP_PORT = 8080
STATE_DIR = "/home/choreo/state"

METRIC_RE = re.compile(r"\bchoreo_[a-zA-Z0-9_]+")
# A ${VAR:-default} of compose, resolved to its default so the tests do not depend on the shell.
COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


# --- helpers shared with tests/integration/test_image_entrypoint.py ---------------------------


def dockerfile_stages(path: Path = ROOT / "Dockerfile") -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued instruction"
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line!r}"
        stages[-1].append((instruction, args.strip()))
    return stages


def dockerfile_entrypoint() -> list[str]:
    entrypoints = [args for instr, args in dockerfile_stages()[-1] if instr == "ENTRYPOINT"]
    assert entrypoints, "the final stage has no ENTRYPOINT"
    value = json.loads(entrypoints[-1])  # exec form: signals reach choreo, not a shell
    assert isinstance(value, list)
    return [str(v) for v in value]


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())  # SafeLoader resolves the <<: merges
    assert isinstance(data, dict)
    return data


def resolve_compose_vars(value: str) -> str:
    return COMPOSE_VAR.sub(lambda m: m.group(2) or "", value)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever form compose allows it in."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): resolve_compose_vars(str(v)) for k, v in env.items()}


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_with_the_choreo_entrypoint() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    final = stages[-1]
    assert "slim" in final[0][1], f"runtime base should be a slim image, got {final[0][1]!r}"
    assert any(instr == "COPY" and "--from=" in args for instr, args in final), "final stage copies the build"
    users = [args for instr, args in final if instr == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert dockerfile_entrypoint() == ["choreo"]
    exposed = {port.split("/")[0] for instr, args in final if instr == "EXPOSE" for port in args.split()}
    assert str(HTTP_PORT) in exposed
    healthchecks = [args for instr, args in final if instr == "HEALTHCHECK"]
    assert healthchecks, "no HEALTHCHECK"
    assert "/healthz" in healthchecks[-1]
    assert "urllib" in healthchecks[-1], "slim images have no curl"
    env = " ".join(args for instr, args in final if instr == "ENV")
    assert f"CHOREO_HTTP_PORT={HTTP_PORT}" in env
    assert f"CHOREO_STATE_DIR={STATE_DIR}" in env


def test_dockerfile_installs_the_deployment_extras() -> None:
    text = " ".join(args for stage in dockerfile_stages() for instr, args in stage if instr == "RUN")
    extras = re.search(r"\.whl\)?\[([a-z,]+)\]", text)
    assert extras is not None, "the wheel is not installed with extras"
    assert set(extras.group(1).split(",")) >= {"otlp", "postgres", "redis"}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.group(1).split(",")) <= set(declared), "an extra the package does not declare"


# --- docker compose ---------------------------------------------------------------------------


def test_compose_has_every_service() -> None:
    services = compose()["services"]
    assert {"rabbitmq", "postgres", "prometheus", "grafana", "jaeger", *AGENTS} <= set(services)


@pytest.mark.parametrize("agent", AGENTS)
def test_compose_agent_service_is_scalable_and_observable(agent: str) -> None:
    data = compose()
    service = data["services"][agent]
    # `--scale` starts N containers of one service: a fixed name or host port breaks the second.
    assert "container_name" not in service
    assert not service.get("ports"), f"{agent} publishes host ports {service.get('ports')}"
    assert service["command"] == ["worker", f"agents.{agent}:agent"]
    assert service["build"]["context"] == ".."
    assert (COMPOSE_DIR / service["build"]["context"] / service["build"].get("dockerfile", "Dockerfile")).is_file()

    env = service_env(service)
    assert env["CHOREO_HTTP_PORT"] == str(HTTP_PORT)
    assert urlparse(env["CHOREO_AMQP_URL"]).hostname == "rabbitmq"
    assert env["CHOREO_SIGNING_KEYS"], "signing keys must default to something"
    dedup = urlparse(env["CHOREO_DEDUP_URL"])
    assert dedup.scheme == "postgresql", "replicas need a shared dedup store"
    assert dedup.hostname == "postgres"
    assert env["OTEL_SERVICE_NAME"] == agent
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname == "jaeger"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"

    healthcheck = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{HTTP_PORT}/readyz" in healthcheck

    depends = service["depends_on"]
    for dependency in ("rabbitmq", "postgres"):
        assert depends[dependency]["condition"] == "service_healthy"
        assert data["services"][dependency]["healthcheck"]["test"]

    # Replicas share the agent's named volume for their SQLite state.
    mounts = [str(v).split(":") for v in service["volumes"]]
    state = [m for m in mounts if m[1] == STATE_DIR]
    assert len(state) == 1, f"{agent} has no volume at {STATE_DIR}"
    assert state[0][0] in data["volumes"], "the state volume must be a declared named volume"

    grace = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
    assert grace is not None
    assert int(grace.group(1)) > 30, "stop_grace_period must exceed CHOREO_SHUTDOWN_GRACE_S (30)"


def test_compose_agents_do_not_share_state_volumes() -> None:
    services = compose()["services"]
    volumes = {agent: tuple(services[agent]["volumes"]) for agent in AGENTS}
    assert len(set(volumes.values())) == len(AGENTS)


def _host_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: container path -> host path (relative to compose/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def test_every_file_mounted_by_compose_exists() -> None:
    mounted = [source for service in compose()["services"].values() for source in _host_mounts(service).values()]
    assert mounted, "expected config files mounted into rabbitmq, prometheus and grafana"
    missing = [source for source in mounted if not (COMPOSE_DIR / source).exists()]
    assert missing == []


def test_rabbitmq_enables_management_and_prometheus() -> None:
    service = compose()["services"]["rabbitmq"]
    assert service["image"].startswith("rabbitmq:3.13-management")
    plugins_file = _host_mounts(service)["/etc/rabbitmq/enabled_plugins"]
    text = (COMPOSE_DIR / plugins_file).read_text().strip()
    match = re.fullmatch(r"\[([a-z_,\s]*)\]\.", text)  # an Erlang term: a list, then a full stop
    assert match is not None, f"not an Erlang list term: {text!r}"
    plugins = {p.strip() for p in match.group(1).split(",")}
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= plugins


def test_jaeger_accepts_otlp() -> None:
    service = compose()["services"]["jaeger"]
    assert service["image"].startswith("jaegertracing/all-in-one")
    assert service_env(service)["COLLECTOR_OTLP_ENABLED"] == "true"
    assert any(str(p).startswith("16686:") for p in service["ports"])


def _prometheus_config() -> dict[str, Any]:
    service = compose()["services"]["prometheus"]
    path = COMPOSE_DIR / _host_mounts(service)["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict)
    return config


def test_prometheus_scrapes_every_replica_of_every_agent_and_rabbitmq() -> None:
    jobs = _prometheus_config()["scrape_configs"]
    dns = [sd for job in jobs for sd in job.get("dns_sd_configs", [])]
    # Docker DNS answers a service name with every replica's address: each gets scraped.
    discovered = {name for sd in dns if sd["type"] == "A" and sd["port"] == HTTP_PORT for name in sd["names"]}
    assert set(AGENTS) <= discovered
    agent_jobs = [job for job in jobs if job.get("dns_sd_configs")]
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in agent_jobs)
    static = {target for job in jobs for sc in job.get("static_configs", []) for target in sc["targets"]}
    assert "rabbitmq:15692" in static


def _grafana_mount(target: str) -> Path:
    return COMPOSE_DIR / _host_mounts(compose()["services"]["grafana"])[target]


def _prometheus_datasource_uid() -> str:
    folder = _grafana_mount("/etc/grafana/provisioning") / "datasources"
    sources = [ds for f in sorted(folder.glob("*.y*ml")) for ds in yaml.safe_load(f.read_text())["datasources"]]
    prometheus = [ds for ds in sources if ds["type"] == "prometheus"]
    assert len(prometheus) == 1
    assert prometheus[0]["url"] == "http://prometheus:9090"
    assert prometheus[0]["uid"], "the dashboard refers to the datasource by a fixed uid"
    return str(prometheus[0]["uid"])


def _dashboard() -> dict[str, Any]:
    data = json.loads((_grafana_mount("/var/lib/grafana/dashboards") / "choreo.json").read_text())
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [str(t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(str(query.get("query", "") if isinstance(query, dict) else query or ""))
    return exprs


def test_grafana_provisions_the_dashboard_folder_it_is_given() -> None:
    folder = _grafana_mount("/etc/grafana/provisioning") / "dashboards"
    providers = [p for f in sorted(folder.glob("*.y*ml")) for p in yaml.safe_load(f.read_text())["providers"]]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uid = _prometheus_datasource_uid()
    dashboard = _dashboard()
    panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
    assert len(panels) >= 8
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no queries"
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", {"uid": uid})["uid"] == uid, panel["title"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_dashboard_queries_only_metrics_the_runtime_exports() -> None:
    used = {name for expr in _exprs(_dashboard()) for name in METRIC_RE.findall(expr)}
    assert {name for name in used if not _known_by_runtime(name)} == set()
    # What operators need on one screen: throughput, failures, latency, capacity, backlog.
    for needed in (
        "choreo_messages_received_total",
        "choreo_messages_handled_total",
        "choreo_messages_failed_total",
        "choreo_messages_dead_lettered_total",
        "choreo_handler_duration_seconds_bucket",
        "choreo_publish_confirm_seconds_bucket",
        "choreo_messages_in_flight",
        "choreo_consumers_attached",
    ):
        assert needed in used, f"no panel shows {needed}"
    exprs = " ".join(_exprs(_dashboard()))
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs
    assert "by (agent, reason)" in exprs, "dead letters should be broken down by reason"
    assert "rabbitmq_queue_messages_ready" in exprs, "queue depth from rabbitmq_prometheus"


def _known_by_runtime(name: str) -> bool:
    """``name`` as queried, against the families the metrics module exports (counters with their
    ``_total``, histograms by base name: a query reads their ``_bucket``/``_sum``/``_count``)."""
    if name in METRIC_NAMES:
        return True
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base != name and base in METRIC_NAMES and not base.endswith("_total")


# --- Kubernetes -------------------------------------------------------------------------------


def _k8s_documents() -> dict[str, list[dict[str, Any]]]:
    documents = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.name} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path.name
            assert doc.get("apiVersion"), path.name
            assert doc.get("kind"), path.name
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path.name
        documents[path.name] = docs
    return documents


def _k8s(kind: str) -> dict[str, dict[str, Any]]:
    found = {}
    for docs in _k8s_documents().values():
        for doc in docs:
            if doc["kind"] == kind:
                assert doc["metadata"]["name"] not in found, f"two {kind}s named {doc['metadata']['name']}"
                found[doc["metadata"]["name"]] = doc
    return found


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = list(kustomization["resources"])
    present = sorted(p.name for p in K8S_DIR.glob("*.y*ml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present
    assert len(listed) == len(set(listed))


def test_k8s_namespaced_objects_share_the_namespace() -> None:
    namespaces = set(_k8s("Namespace"))
    assert len(namespaces) == 1
    for name, docs in _k8s_documents().items():
        for doc in docs:
            if doc["kind"] not in {"Namespace", "Kustomization"}:
                assert doc["metadata"].get("namespace") in namespaces, f"{name}: {doc['kind']}"


def test_k8s_secret_example_is_clearly_a_placeholder() -> None:
    secrets = _k8s("Secret")
    assert len(secrets) == 1
    data = next(iter(secrets.values()))["stringData"]
    for key in ("CHOREO_SIGNING_KEYS", "CHOREO_DEDUP_URL", "CHOREO_AMQP_URL"):
        assert "REPLACE_ME" in data[key], f"{key} looks like a real value"
    assert urlparse(data["CHOREO_DEDUP_URL"]).scheme in {"postgresql", "redis"}, "replicas need a shared store"


@pytest.mark.parametrize("agent", AGENTS)
def test_k8s_agent_deployment(agent: str) -> None:
    deployment = _k8s("Deployment")[agent]
    pod = deployment["spec"]["template"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    spec = pod["spec"]
    (container,) = spec["containers"]
    image = container["image"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image.endswith(f":{version}"), f"image tag {image} is not the package version {version}"
    assert container["args"] == ["worker", f"agents.{agent}:agent"]
    assert "command" not in container, "the image's ENTRYPOINT (choreo) must stay"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in {"http", HTTP_PORT}

    # Settings come from the ConfigMap and Secret of this folder, and they agree with the probes.
    configmaps, secrets = _k8s("ConfigMap"), _k8s("Secret")
    sources = container["envFrom"]
    refs = {(k, v["name"]) for source in sources for k, v in source.items()}
    assert refs <= {("configMapRef", n) for n in configmaps} | {("secretRef", n) for n in secrets}
    settings = {k: v for kind, name in refs if kind == "configMapRef" for k, v in configmaps[name]["data"].items()}
    assert settings["CHOREO_HTTP_PORT"] == str(HTTP_PORT)
    assert {e["name"]: e.get("value") for e in container.get("env", [])}["OTEL_SERVICE_NAME"] == agent
    assert spec["terminationGracePeriodSeconds"] > float(settings["CHOREO_SHUTDOWN_GRACE_S"])

    pod_security = spec.get("securityContext", {})
    container_security = container["securityContext"]
    assert pod_security.get("runAsNonRoot") or container_security.get("runAsNonRoot")
    assert container_security["readOnlyRootFilesystem"] is True
    assert container_security["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[settings.get("CHOREO_STATE_DIR", STATE_DIR)]]
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(HTTP_PORT)


@pytest.mark.parametrize("agent", AGENTS)
def test_k8s_pdb_selects_exactly_the_agents_pods(agent: str) -> None:
    pdb = _k8s("PodDisruptionBudget")[agent]
    assert "minAvailable" in pdb["spec"] or "maxUnavailable" in pdb["spec"]
    deployments = _k8s("Deployment")
    selector = pdb["spec"]["selector"]["matchLabels"]
    selected = [n for n, d in deployments.items() if _matches(selector, d["spec"]["template"]["metadata"]["labels"])]
    assert selected == [agent]


@pytest.mark.parametrize("agent", AGENTS)
def test_k8s_scaled_object_scales_the_agent_on_its_queue(agent: str) -> None:
    scaled = _k8s("ScaledObject")[agent]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] in _k8s("Deployment")
    assert target["name"] == agent
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["queueName"] == agent
    assert int(trigger["metadata"]["value"]) > 0

    # KEDA needs the broker URL: from the target's environment, or a TriggerAuthentication.
    if "hostFromEnv" in trigger["metadata"]:
        assert trigger["metadata"]["hostFromEnv"] == "CHOREO_AMQP_URL"
        return
    auth = _k8s("TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (host,) = [ref for ref in auth["spec"]["secretTargetRef"] if ref["parameter"] == "host"]
    secret = _k8s("Secret")[host["name"]]
    assert host["key"] in secret["stringData"]
    assert urlparse(secret["stringData"][host["key"]]).scheme in {"amqp", "amqps"}
