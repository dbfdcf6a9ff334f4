"""deploy/: every kustomize overlay renders and validates against the Kubernetes schemas offline
(the inference gateway's InferencePool and HTTPRoute against the schemas of their API's fields);
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
OVERLAYS = ["base", "overlays/prometheus-operator", "overlays/trainer-job", "overlays/trainer-job-distributed", "overlays/hpa",
            "overlays/inference-gateway", "overlays/tenants", "overlays/s3-store"]
K8S_VERSION = "1.32.0"
BIN = Path(sys.executable).parent
SCHEMAS = ROOT / "tests" / "schemas"
# The fields of InferencePool (v1.5.0) and HTTPRoute (v1.5.1) the overlay uses, as JSON Schemas written
# from their API references (the CRDs themselves are other projects' files, not copied here).
GATEWAY_SCHEMAS = SCHEMAS / "inference_gateway.yaml"
EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
# Each of the EPP's metric flags (server.metrics.PROTOCOL_METRICS' keys) and the field of a
# core-metrics-extractor engineConfig that replaces it in v1.5.0, which exits when given the flags
# (pkg/epp/server/options.go: "deprecated and cannot be used; configure metrics via engineConfigs").
EPP_METRIC_FIELDS = {"total-queued-requests-metric": "queuedRequestsSpec", "total-running-requests-metric": "runningRequestsSpec",
                     "kv-cache-usage-percentage-metric": "kvUsageSpec", "lora-info-metric": "loraSpec",
                     "cache-info-metric": "cacheInfoSpec"}


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:  # not a Debian package, and PyPI has none: install it to run these
        pytest.skip("kubectl not installed (https://kubernetes.io/docs/tasks/tools/): the overlays are rendered with "
                    "`kubectl kustomize`")
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
    crds = {"ServiceMonitor", "PrometheusRule", "InferencePool", "HTTPRoute"}
    for doc in docs:
        if doc["kind"] in crds:
            continue  # checked below: field by field, or against tests/schemas/inference_gateway.yaml
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


def ttft_series(namespace: str, adapter: str, seconds: float, per_minute: int) -> list[dict]:
    """Cumulative histogram buckets of hotlora_time_to_first_token_seconds for an adapter whose
    every request takes `seconds` to its first token, `per_minute` of them each minute."""
    from server.metrics import LATENCY_BUCKETS

    labels = f'namespace="{namespace}",adapter="{adapter}"'
    series = []
    for le in [*map(str, LATENCY_BUCKETS), "+Inf"]:
        rate = per_minute if float(le) >= seconds else 0
        series.append({"series": f'hotlora_time_to_first_token_seconds_bucket{{{labels},le="{le}"}}',
                       "values": f"0+{rate}x60"})
    series.append({"series": f"hotlora_time_to_first_token_seconds_count{{{labels}}}", "values": f"0+{per_minute}x60"})
    return series


@pytest.mark.parametrize("slow_seconds, fires", [(4.0, True), (0.08, False), (0.3, False)],
                         ids=["one adapter far above the fleet", "all alike", "slower but under the floor"])
def test_slow_adapter_alert_fires_for_one_adapter_far_above_the_fleet(tmp_path, slow_seconds, fires):
    """promtool's rule unit tests on synthetic histograms. Namespace a: three busy adapters at
    80 ms to first token and one quieter adapter (2 requests a minute) at `slow_seconds`.
    Namespace b, another deployment scraped by the same Prometheus: every adapter at 4 s, which is
    its fleet's normal, so nothing there fires (and its slowness does not hide a's)."""
    series = [s for name in ("fast1", "fast2", "fast3") for s in ttft_series("a", name, 0.08, 60)]
    series += ttft_series("a", "slow", slow_seconds, 2)
    series += [s for name in ("b1", "b2") for s in ttft_series("b", name, 4.0, 60)]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]
    annotations = next(r for r in rules if r.get("alert") == "HotloraAdapterSlowFirstToken")["annotations"]
    p95 = 2.5 + 0.95 * (5 - 2.5)  # histogram_quantile interpolates within 4 s's bucket, (2.5, 5]
    expected = [{"exp_labels": {"severity": "warning", "namespace": "a", "adapter": "slow"}, "exp_annotations": {
        "summary": annotations["summary"].replace("{{ $labels.adapter }}", "slow"),
        "description": annotations["description"].replace("{{ $labels.adapter }}", "slow").replace(
            "{{ $value | humanizeDuration }}", f"{p95:g}s")}}] if fires else []
    tests = {"rule_files": [str(DEPLOY / "prometheus" / "rules.yml")], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [
                 {"eval_time": "40m", "alertname": "HotloraAdapterSlowFirstToken", "exp_alerts": expected}]}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests))
    checked = subprocess.run([promtool(), "test", "rules", str(tmp_path / "test.yml")], capture_output=True, text=True)
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


def test_tenants_overlay_gives_the_server_a_tenants_file_it_accepts(tmp_path):
    import hashlib

    from server.serving.main import parse_args
    from server.serving.tenants import parse_tenants

    docs = render("overlays/tenants")
    secret = one(docs, "Secret", "hotlora-auth")["stringData"]
    table = parse_tenants(secret["tenants.yaml"])
    for key in ("replace-me-acme-key", "replace-me-globex-key"):  # the keys the comment names are the file's
        assert hashlib.sha256(key.encode()).digest() in table.keys, key
    assert hashlib.sha256(b"replace-me-acme-admin").digest() in table.admin_keys
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "hotlora-auth" and "subPath" not in str(container["volumeMounts"])
    for variable, item in (("HOTLORA_TENANTS_FILE", "tenants.yaml"), ("HOTLORA_ADMIN_TOKEN_FILE", "admin-token")):
        assert env[variable] == f"{mounts['auth']}/{item}"
        (tmp_path / item).write_text(secret[item])
    assert env["HOTLORA_USAGE_LOG"] == mounts["usage"]
    assert volumes["usage"]["persistentVolumeClaim"]["claimName"] == one(docs, "PersistentVolumeClaim", "hotlora-usage")["metadata"]["name"]
    config_map = one(docs, "ConfigMap")["data"]
    config = parse_args([], environ={**config_map, "HOTLORA_TENANTS_FILE": str(tmp_path / "tenants.yaml"),
                                     "HOTLORA_ADMIN_TOKEN_FILE": str(tmp_path / "admin-token"),
                                     "HOTLORA_USAGE_LOG": env["HOTLORA_USAGE_LOG"]})
    assert config.tenants_file.name == "tenants.yaml" and str(config.usage_log) == "/usage" and config.admin_token


def test_s3_store_overlay_needs_no_shared_volume_and_both_sides_name_one_bucket():
    from server.serving.main import parse_args

    docs = render("overlays/s3-store")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "hotlora-adapters"]
    config_map = one(docs, "ConfigMap")["data"]
    config = parse_args([], environ=config_map)
    assert config.adapters.store.startswith("s3://") and str(config.adapters.cache_dir) == "/cache"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    job = one(docs, "Job")["spec"]["template"]["spec"]
    secret = one(docs, "Secret", "hotlora-s3")
    for spec in (pod, job):
        claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
        assert "hotlora-adapters" not in claims
        container = spec["containers"][0]
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["adapter-cache"] == str(config.adapters.cache_dir)
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "adapter-cache")
    args = job["containers"][0]["args"]
    assert f"--store={config.adapters.store}" in args and any(a.startswith("--notify=hotlora-replicas") for a in args)
    assert set(secret["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert one(docs, "ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]


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


def test_distributed_trainer_job_runs_torchrun_across_its_indexed_pods():
    """torchrun's own parser reads the container's args: as many nodes as the Job has pods, each
    pod's rank from its completion index, rendezvous at pod 0's name under the headless Service;
    the trainer's parser reads what torchrun runs."""
    from torch.distributed.run import get_args_parser

    from trainer.cli import build_parser

    docs = render("overlays/trainer-job-distributed")
    job = one(docs, "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["torchrun"] and spec["completionMode"] == "Indexed"
    index = next(e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX")  # declared, so $() expands
    pods = [get_args_parser().parse_args([a.replace("$(JOB_COMPLETION_INDEX)", str(i)) for a in container["args"]])
            for i in range(spec["completions"])]  # the args each pod runs, as the kubelet expands them
    assert [p.node_rank for p in pods] == list(range(spec["completions"]))
    launch = pods[0]
    assert int(launch.nnodes) == spec["completions"] == spec["parallelism"] == 2
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    service = one(docs, "Service", pod["subdomain"])
    assert launch.master_addr == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert launch.master_port in [p["port"] for p in service["spec"]["ports"]]
    assert launch.module and launch.training_script == "trainer.cli"
    args = build_parser().parse_args(launch.training_script_args)
    assert args.command == "fit" and args.resume and args.store == "/adapters" and args.notify
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"  # a failed rank fails the Job: no half-run retry


def gateway_schema(kind: str) -> dict:
    schemas = yaml.safe_load(GATEWAY_SCHEMAS.read_text())
    return {"$defs": schemas["$defs"], **schemas[kind]}


def refused(validator, doc: dict, change) -> bool:
    broken = json.loads(json.dumps(doc))
    change(broken)
    return not validator.is_valid(broken)


@pytest.mark.parametrize("kind", ["InferencePool", "HTTPRoute"])
def test_inference_gateway_pool_and_route_validate_against_their_api(kind):
    """The overlay's InferencePool and HTTPRoute against the schemas of their API versions'
    fields (tests/schemas/inference_gateway.yaml), and the same schemas refuse broken objects and
    misspelled fields: the check can fail."""
    import jsonschema

    doc = one(render("overlays/inference-gateway"), kind)
    schema = gateway_schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not problems, problems
    if kind == "InferencePool":
        assert refused(validator, doc, lambda d: d["spec"].pop("selector"))
        assert refused(validator, doc, lambda d: d["spec"]["targetPorts"][0].update(number=70000))
        assert refused(validator, doc, lambda d: d["spec"].update(targetPorts=[]))
        assert refused(validator, doc, lambda d: d["spec"]["endpointPickerRef"].update(failureMode="Sometimes"))
        assert refused(validator, doc, lambda d: d["spec"]["selector"]["matchLabels"].update(app="not a label value"))
        assert refused(validator, doc, lambda d: d["spec"].update(targetPort=8000))
    else:
        assert refused(validator, doc, lambda d: d["spec"]["rules"][0]["matches"][0]["path"].update(type="Prefix"))
        assert refused(validator, doc, lambda d: d["spec"]["rules"][0]["backendRefs"][0].pop("name"))
        assert refused(validator, doc, lambda d: d["spec"]["parentRefs"][0].update(name=""))
        assert refused(validator, doc, lambda d: d["spec"]["rules"][0]["timeouts"].update(request="5 minutes"))
        assert refused(validator, doc, lambda d: d["spec"]["rules"][0].update(backendRef=[]))


def epp_flags(args: list[str]) -> dict[str, str]:
    """`--name value` and `--name=value` as {name: value}; a bare `--name` as "true"."""
    flags, i = {}, 0
    while i < len(args):
        assert args[i].startswith("--"), args[i]
        name, eq, value = args[i][2:].partition("=")
        if not eq:
            value = "true"
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
        assert name not in flags, f"--{name} given twice"
        flags[name] = value
        i += 1
    return flags


def test_inference_gateway_overlay_agrees_with_the_server_code():
    """The pool selects the server pods and routes to their HTTP port; its EPP is the one the overlay
    runs, reads hotlora's metric names (server.metrics.PROTOCOL_METRICS) and scores with the four
    scorers and the picker."""
    from server.metrics import PROTOCOL_METRICS
    from server.serving.main import parse_args

    docs = render("overlays/inference-gateway")
    config = parse_args([], environ=one(docs, "ConfigMap", "hotlora-server")["data"])
    pool = one(docs, "InferencePool")
    server = one(docs, "Deployment", "hotlora")
    server_pod = server["spec"]["template"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= server_pod["metadata"]["labels"].items()
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()] == ["hotlora"]  # not the EPP
    ports = {p["name"]: p["containerPort"] for p in server_pod["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]] == [config.http_port]
    assert pool["spec"]["appProtocol"] == "http"

    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    service = one(docs, "Service", ref["name"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc-ext-proc"] == ref["port"]["number"]
    epp = one(docs, "Deployment", "hotlora-epp")
    epp_pod = epp["spec"]["template"]
    assert service["spec"]["selector"].items() <= epp_pod["metadata"]["labels"].items()
    assert epp["spec"]["selector"]["matchLabels"].items() <= epp_pod["metadata"]["labels"].items()
    [container] = epp_pod["spec"]["containers"]
    assert container["image"] == EPP_IMAGE
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == ref["port"]["number"]
    for probe in ("livenessProbe", "readinessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == {p["name"]: p["containerPort"] for p in container["ports"]}["grpc-health"]
        assert grpc_probe["service"] == "inference-extension"  # the EPP's health name with one replica
    assert epp["spec"]["replicas"] == 1 and epp["spec"]["strategy"]["type"] == "Recreate"
    assert epp_pod["spec"]["terminationGracePeriodSeconds"] >= server_pod["spec"]["terminationGracePeriodSeconds"]

    flags = epp_flags(container["args"])
    assert flags["pool-name"] == pool["metadata"]["name"] and flags["pool-group"] == "inference.networking.k8s.io"
    assert flags.get("pool-namespace", pool["metadata"]["namespace"]) == pool["metadata"]["namespace"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"  # the pool's, without --pool-namespace
    assert not set(PROTOCOL_METRICS) & set(flags), "v1.5.0's EPP exits on its deprecated metric flags"

    # The config file: the ConfigMap key mounted where --config-file points.
    config_dir, config_file = flags["config-file"].rsplit("/", 1)
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == config_dir]
    [volume] = [v for v in epp_pod["spec"]["volumes"] if v["name"] == mount["name"]]
    picker_config = yaml.safe_load(one(docs, "ConfigMap", volume["configMap"]["name"])["data"][config_file])
    assert picker_config["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1" and picker_config["kind"] == "EndpointPickerConfig"
    assert set(picker_config) <= {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector",
                                  "dataLayer", "flowControl", "parser"}  # the EPP decodes strictly
    plugins = {p.get("name", p["type"]): p for p in picker_config["plugins"]}
    assert len(plugins) == len(picker_config["plugins"])
    scorers = {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "lora-affinity-scorer"}
    assert scorers | {"max-score-picker"} <= {p["type"] for p in plugins.values()}
    assert plugins["prefix-cache-scorer"]["parameters"]["blockSizeTokens"] == config.engine.kv_block_size
    [profile] = [p for p in picker_config["schedulingProfiles"] if p["name"] == "default"]
    used = {plugins[e["pluginRef"]]["type"]: e.get("weight") for e in profile["plugins"]}
    assert set(used) == scorers | {"max-score-picker"}
    assert all(used[s] > 0 for s in scorers) and used["max-score-picker"] is None  # pickers take no weight

    # hotlora's metric names, as an engine config that every pod of the pool uses (it has no engine label).
    [extractor] = [p for p in plugins.values() if p["type"] == "core-metrics-extractor"]
    engines = {e["name"]: e for e in extractor["parameters"]["engineConfigs"]}
    engine = engines[extractor["parameters"]["defaultEngine"]]
    assert set(PROTOCOL_METRICS) == set(EPP_METRIC_FIELDS)
    assert {k: v for k, v in engine.items() if k != "name"} == {EPP_METRIC_FIELDS[flag]: name for flag, name in PROTOCOL_METRICS.items()}
    assert extractor["parameters"].get("engineLabelKey", "inference.networking.k8s.io/engine-type") not in server_pod["metadata"]["labels"]
    [source] = [s for s in picker_config["dataLayer"]["sources"] if plugins[s["pluginRef"]]["type"] == "metrics-data-source"]
    assert [e["pluginRef"] for e in source["extractors"]] == [extractor.get("name", extractor["type"])]
    assert plugins[source["pluginRef"]].get("parameters", {}).get("path", "/metrics") == "/metrics"  # on the targetPort, as vLLM


def test_inference_gateway_route_and_rbac_reach_the_pool():
    """The HTTPRoute sends the OpenAI-compatible API from the platform's Gateway to the pool; the
    EPP's ServiceAccount may read the pool's pods and the pool (the v1.5.0 chart's rules)."""
    docs = render("overlays/inference-gateway")
    pool, route = one(docs, "InferencePool"), one(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    [parent] = route["spec"]["parentRefs"]
    assert (parent.get("group", "gateway.networking.k8s.io"), parent.get("kind", "Gateway"), parent["name"]) == \
        ("gateway.networking.k8s.io", "Gateway", "inference-gateway")
    [rule] = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}]
    assert {"type": "PathPrefix", "value": "/v1"} in [m["path"] for m in rule["matches"]]

    epp = one(docs, "Deployment", "hotlora-epp")["spec"]["template"]["spec"]
    account = one(docs, "ServiceAccount", epp["serviceAccountName"])
    assert account.get("automountServiceAccountToken", True) and epp.get("automountServiceAccountToken", True)
    binding = one(docs, "RoleBinding")
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": pool["metadata"]["namespace"]}
    assert subject in binding["subjects"]
    role = one(docs, "Role", binding["roleRef"]["name"])
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    for needed in [("", "pods"), ("inference.networking.k8s.io", "inferencepools"),
                   ("inference.networking.x-k8s.io", "inferenceobjectives"), ("inference.networking.x-k8s.io", "inferencemodelrewrites")]:
        assert {"get", "watch", "list"} <= granted.get(needed, set()), needed
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]  # namespaced, as the chart


def test_grafana_dashboard_uses_only_metrics_the_server_exports():
    from server.metrics import Metrics

    metrics = Metrics()
    stats = {"queue_length": 0, "running": 0, "kv_cache_usage_ratio": 0.0, "kv_blocks_used": 0, "kv_blocks_free": 8,
             "preemptions": 0, "prefix_cache_prompt_tokens": 0, "prefix_cache_hit_tokens": 0}
    metrics.watch_engine(lambda: stats, lambda: {"device": 0})
    metrics.requests.labels("base", "OK", "grpc").inc()  # labelled series appear once they have a child
    metrics.generation_tokens.labels("base").inc()
    for counter in (metrics.tenant_prompt_tokens, metrics.tenant_cached_tokens, metrics.tenant_completion_tokens):
        counter.labels("default").inc()
    metrics.tenant_rejections.labels("default", "concurrent").inc()
    for histogram in (metrics.request_duration, metrics.time_to_first_token, metrics.time_per_output_token):
        histogram.labels("base").observe(0.1)
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    dashboard = json.loads((DEPLOY / "prometheus" / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for t in panel["targets"] for name in re.findall(r"hotlora_\w+", t["expr"])}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "first token", "queue", "kv cache", "tier", "loads", "preemptions", "prefix cache",
                  "slowest adapters", "tokens/s per tenant", "rejections/s per tenant"):
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
