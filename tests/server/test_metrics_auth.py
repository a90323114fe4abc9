"""`--protect-metrics`: with API keys set, /metrics asks for one too; without the flag it stays
open (for a Prometheus scraper inside the cluster), and the probes are open either way."""

from __future__ import annotations

import httpx
import pytest

from server.settings import Settings, parse_args

from tests.live import LiveServer


@pytest.fixture(scope="module", params=[True, False], ids=["protected", "open"])
def keyed(request, tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=2, api_key=["k1", "k2"],
                             protect_metrics=request.param)) as s:
        yield s, request.param


def _get(s, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(s.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def _refused(s) -> float:
    text = _get(s, "/metrics", "k1").text
    lines = [x for x in text.splitlines() if x.startswith("slime_errors_total{") and 'status="401"' in x]
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines)


def test_metrics_need_a_key_exactly_when_protected(keyed):
    s, protected = keyed
    for key in ("k1", "k2"):
        ok = _get(s, "/metrics", key)
        assert ok.status_code == 200 and "slime_requests" in ok.text
    refused = _refused(s)
    for key in (None, "nope", "k1k2"):
        r = _get(s, "/metrics", key)
        if protected:
            assert r.status_code == 401, key
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key" and "slime_" not in r.text
        else:
            assert r.status_code == 200 and "slime_requests" in r.text
    assert _refused(s) == refused + (3 if protected else 0)  # refused scrapes are counted as 401s
    # the inference routes need a key either way; the probes never do
    assert _get(s, "/v1/models").status_code == 401 and _get(s, "/v1/models", "k1").status_code == 200
    assert _get(s, "/health").status_code == 200 and _get(s, "/ready").status_code == 200
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]}),
                       ("/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 1})):
        assert httpx.post(s.url + path, json=body, timeout=30).status_code == 401, path
        r = httpx.post(s.url + path, json=body, headers={"Authorization": "Bearer k2"}, timeout=30)
        assert r.status_code == 200, (path, r.text)


def test_protect_metrics_without_keys_leaves_metrics_open(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=2, protect_metrics=True)) as s:
        assert _get(s, "/metrics").status_code == 200 and _get(s, "/v1/models").status_code == 200


def test_the_flag_and_the_environment_variable(monkeypatch):
    monkeypatch.delenv("SLIME_PROTECT_METRICS", raising=False)
    assert parse_args([]).protect_metrics is False
    assert parse_args(["--protect-metrics"]).protect_metrics is True
    monkeypatch.setenv("SLIME_PROTECT_METRICS", "true")
    assert parse_args([]).protect_metrics is True
    assert parse_args(["--no-protect-metrics"]).protect_metrics is False
