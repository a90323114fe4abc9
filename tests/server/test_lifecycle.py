import threading

import httpx

from server.settings import Settings
from tests.live import LiveServer


def test_ready_is_503_until_loaded_then_200(tiny_dir):
    gate = threading.Event()

    def slow_factory(settings, metrics):
        from server.app import build_service

        gate.wait(30)
        return build_service(settings, metrics)

    s = LiveServer(Settings(model=str(tiny_dir), device="cpu"), service_factory=slow_factory).start(wait_ready=False)
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        r = httpx.get(s.url + "/ready")
        assert r.status_code == 503
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        gate.set()
        s2 = s.start  # noqa: F841
        import time

        deadline = time.time() + 60
        while time.time() < deadline and httpx.get(s.url + "/ready").status_code != 200:
            time.sleep(0.05)
        assert httpx.get(s.url + "/ready").status_code == 200
    finally:
        gate.set()
        s.stop()


def test_settings_from_env_and_flags(monkeypatch):
    from server.settings import Settings, parse_args

    monkeypatch.setenv("SLIME_API_KEY", "k1,k2")
    monkeypatch.setenv("SLIME_MAX_BATCH_SIZE", "4")
    s = Settings()
    assert s.api_key == ["k1", "k2"] and s.max_batch_size == 4
    s = parse_args(["--max-batch-size", "3", "--api-key", "x", "--allow-image-urls"])
    assert s.max_batch_size == 3 and s.api_key == ["x"] and s.allow_image_urls
