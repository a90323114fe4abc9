"""Two server processes behind a real nginx (our docker/nginx/nginx.conf, upstreams pointed at
127.0.0.1), and a real Prometheus scraping a running server."""

import json
import re
import signal
import subprocess
import time

import httpx
import pytest

from bench.routing import nginx_config as routed_nginx_config
from tests.live import free_port, start_server_process, wait_for
from tests.tools import tool

pytestmark = pytest.mark.deploy


@pytest.fixture(scope="module")
def two_servers(tiny_dir):
    ports = [free_port(), free_port()]
    procs = []
    try:
        for p in ports:
            procs.append(start_server_process(tiny_dir, port=p)[0])
        yield procs, ports
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def nginx_config(repo, tmp_path, ports, listen):
    path = tmp_path / "nginx.conf"
    path.write_text(routed_nginx_config((repo / "docker/nginx/nginx.conf").read_text(), ports, listen, tmp_path))
    return path


def test_nginx_balances_streams_and_survives_a_dead_replica(repo, tmp_path, two_servers):
    nginx = tool("nginx", "the Debian package nginx")
    procs, ports = two_servers
    listen = free_port()
    conf = nginx_config(repo, tmp_path, ports, listen)
    lb = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{listen}"
    try:
        wait_for(url, "/lb-health", timeout=20)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                "stream": True, "stream_options": {"include_usage": True}}

        def stream_ok():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                lines = [x for x in r.iter_lines() if x]
            assert lines[-1] == "data: [DONE]"
            return json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 8

        assert all(stream_ok() for _ in range(6))
        # both replicas served traffic (least_conn with sequential requests alternates)
        served = [float(re.search(r"^slime_generation_tokens_total (\S+)", httpx.get(
            f"http://127.0.0.1:{p}/metrics").text, re.M).group(1)) for p in ports]
        assert all(s > 0 for s in served), served
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        assert all(stream_ok() for _ in range(6))  # the load balancer keeps answering
    finally:
        lb.terminate()
        lb.wait(10)


def test_prometheus_scrapes_slime_series(repo, tmp_path, two_servers):
    prometheus = tool("prometheus", "the Debian package prometheus")
    _, ports = two_servers
    port = ports[1]
    httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
               json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: slime\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
    web = free_port()
    prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        result = []
        while time.time() < deadline and not result:
            time.sleep(1)
            try:
                r = httpx.get(f"http://127.0.0.1:{web}/api/v1/query",
                              params={"query": '{__name__=~"slime_.*"}'}, timeout=5)
                result = r.json()["data"]["result"] if r.status_code == 200 else []
            except httpx.TransportError:
                pass
        names = {s["metric"]["__name__"] for s in result}
        assert "slime_generation_tokens_total" in names and "slime_num_requests_running" in names, names
    finally:
        prom.terminate()
        prom.wait(20)
