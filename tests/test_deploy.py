"""deploy/: every kustomize overlay renders and validates against the Kubernetes schemas offline;
the manifests agree with the code (flags, ports, health service names, grace periods); a real
Prometheus scrapes a running hotlora-server with deploy/prometheus/prometheus.yml; the alert rules
pass promtool; the Dockerfile passes hadolint and copies what exists."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ["base", "overlays/prometheus-operator", "overlays/trainer-job", "overlays/hpa"]
K8S_VERSION = "1.32.0"
BIN = Path(sys.executable).parent


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / overlay)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay):
    import kubernetes_validate

    docs = render(overlay)
    crds = {"ServiceMonitor", "PrometheusRule"}
    for doc in docs:
        if doc["kind"] in crds:
            continue  # checked field by field below: no offline schema for CRDs
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"} <= {d["kind"] for d in docs}


def test_prometheus_operator_objects_point_at_the_service_and_its_metrics_port():
    docs = render("overlays/prometheus-operator")
    service, monitor = one(docs, "Service", "hotlora"), one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [d for d in docs if d["kind"] == "Service" and all(
        d["metadata"].get("labels", {}).get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
    assert selected == [service]  # not the headless hotlora-replicas too (it has no metrics port)
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"] and "metrics" in port_names
    rule = one(docs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"HotloraHighErrorRate", "HotloraQueueBacklog", "HotloraAdapterLoadFailures", "HotloraSlowTimeToFirstToken"} <= set(alerts)
    for alert in alerts.values():
        assert alert["expr"] and alert["labels"]["severity"] and alert["annotations"]["summary"]
    hpa = one(render("overlays/hpa"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "hotlora_queue_length"


def test_rules_pass_promtool_and_the_plain_rules_file_matches_the_operator_rule(tmp_path):
    groups = one(render("overlays/prometheus-operator"), "PrometheusRule")["spec"]["groups"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    for path in (tmp_path / "rules.yml", DEPLOY / "prometheus" / "rules.yml"):
        checked = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    assert yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"] == groups
    checked = subprocess.run([promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_manifests_agree_with_the_server_code():
    from server.serving.main import LIVENESS, SERVICE_NAMES, parse_args

    docs = render("base")
    config_map = one(docs, "ConfigMap")["data"]
    help_text = " ".join(subprocess.run([str(BIN / "hotlora-server"), "--help"], capture_output=True, text=True).stdout.split())
    for key in config_map:
        assert f"[env {key}]" in help_text, f"{key} is not a hotlora-server flag"
    config = parse_args([], environ=config_map)  # the server really accepts these settings
    assert str(config.model_dir) == "/models/base" and str(config.adapters.store) == "/adapters"

    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port, "http": config.http_port}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(config.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == config.port
        assert grpc_probe["service"] in (LIVENESS, "", *SERVICE_NAMES), probe
    assert container["readinessProbe"]["grpc"]["service"] in ("", *SERVICE_NAMES)  # NOT_SERVING while draining
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS  # never NOT_SERVING while alive
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + config.grace_period_s + 10
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    service = one(docs, "Service", "hotlora")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    replicas = one(docs, "Service", "hotlora-replicas")  # resolves to every pod: notify reaches each
    assert replicas["spec"]["clusterIP"] == "None" and replicas["spec"]["selector"] == service["spec"]["selector"]
    assert {p["name"]: p["port"] for p in replicas["spec"]["ports"]} == {"grpc": ports["grpc"]}
    pvc = one(docs, "PersistentVolumeClaim", "hotlora-adapters")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    selector = one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())


def test_trainer_job_runs_a_real_trainer_command_into_the_shared_store():
    from trainer.cli import build_parser

    docs = render("overlays/trainer-job")
    job = one(docs, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["trainer"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "fit" and args.resume and args.store == "/adapters"
    service = one(docs, "Service", "hotlora-replicas")  # headless: the notify fans out to every pod
    host, port = args.notify[0].rsplit(":", 1)
    assert host.split(".")[:2] == [service["metadata"]["name"], service["metadata"]["namespace"]]
    assert int(port) in [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert "hotlora-adapters" in claims


def test_grafana_dashboard_uses_only_metrics_the_server_exports():
    from server.metrics import Metrics

    metrics = Metrics()
    stats = {"queue_length": 0, "running": 0, "kv_cache_usage_ratio": 0.0, "kv_blocks_used": 0, "kv_blocks_free": 8,
             "preemptions": 0, "prefix_cache_prompt_tokens": 0, "prefix_cache_hit_tokens": 0}
    metrics.watch_engine(lambda: stats, lambda: {"device": 0})
    metrics.requests.labels("base", "OK", "grpc").inc()  # labelled series appear once they have a child
    metrics.generation_tokens.labels("base").inc()
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    dashboard = json.loads((DEPLOY / "prometheus" / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for t in panel["targets"] for name in re.findall(r"hotlora_\w+", t["expr"])}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "first token", "queue", "kv cache", "tier", "loads", "preemptions", "prefix cache"):
        assert topic in titles, topic


def test_dockerfile_passes_hadolint_and_copies_what_exists():
    dockerfile = DEPLOY / "docker" / "Dockerfile"
    linted = subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout
    text = dockerfile.read_text()
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    entrypoint = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])$", text, re.MULTILINE)[1])
    scripts = re.search(r"\[project.scripts\](.*?)\n\n", (ROOT / "pyproject.toml").read_text(), re.DOTALL)[1]
    assert f'{entrypoint[0]} = "server.serving.main:main"' in scripts
    assert re.search(r"^FROM nvidia/cuda:[\w.-]+-runtime-", text, re.MULTILINE)
    assert re.search(r"^USER 10001$", text, re.MULTILINE)  # non-root, matching runAsUser
    assert set(re.search(r"^EXPOSE (.+)$", text, re.MULTILINE)[1].split()) == {"50051", "9400", "8000"}  # grpc, metrics, http
    assert ".venv" in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()  # BuildKit: next to it


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed: `make test` installs Debian's prometheus package (make system-packages)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_prometheus_scrapes_the_server(llama_dir, tmp_path):
    from clients import Client
    from server.config import EngineConfig, ServerConfig
    from tests.helpers import RunningServer

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed: `make test` installs Debian's prometheus package (make system-packages)")
    config = ServerConfig(model_dir=llama_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                          engine=EngineConfig(max_batch_size=2, max_seq_len=64))
    with RunningServer(config) as server:
        scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        scrape["global"]["scrape_interval"] = "1s"
        scrape["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{server.server.metrics_port}"]
        scrape["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
        web = free_port()
        process = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{web}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            with Client(server.target) as client:
                for _ in range(5):
                    client.generate("Cheese is", max_new_tokens=3, temperature=0.0)
            value = None
            deadline = time.monotonic() + 90
            while value != 5.0:
                assert time.monotonic() < deadline, f"Prometheus never saw 5 requests (last: {value})"
                time.sleep(0.5)
                value = query(web, 'sum(hotlora_requests_total{job="hotlora",code="OK"})')
            assert query(web, 'up{job="hotlora"}') == 1.0
        finally:
            process.terminate()
            process.wait(30)


def query(port: int, promql: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            result = json.loads(response.read())["data"]["result"]
    except OSError:
        return None  # not up yet
    return float(result[0]["value"][1]) if result else None
