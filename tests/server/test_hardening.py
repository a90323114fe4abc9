"""Bad input, limits, auth, image URLs, overload and failures: one clear error, nothing else harmed."""

import asyncio
import base64
import http.server
import struct
import threading
import time
import zlib

import httpx
from PIL import Image

from server.settings import Settings
from tests.live import LiveServer, data_url, image_message, stream_lines

MODEL = "tiny"


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60, **kw)


def assert_error(r, status, *, param=None, code=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def hi(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


# -- errors ----------------------------------------------------------------------------------------
def test_invalid_json_and_non_object(small):
    r = httpx.post(small.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    assert_error(post(small, [1, 2]), 400, code="invalid_json")


def test_schema_violations_are_400_with_param(small):
    assert_error(post(small, hi(temperature=5)), 400, param="temperature")
    assert_error(post(small, {"model": MODEL, "messages": "hello"}), 400, param="messages")
    assert_error(post(small, {"model": MODEL}), 400, param="messages")
    assert_error(post(small, hi(max_tokens=0)), 400, param="max_tokens")
    assert_error(post(small, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400)


def test_wrong_content_type_is_415(small):
    r = httpx.post(small.url + "/v1/chat/completions", content=b"model=tiny", timeout=10,
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(r, 415)


def test_body_over_limit_is_413_declared_and_streamed(small):
    big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * 400_000 + b'"}]}'
    r = httpx.post(small.url + "/v1/chat/completions", content=big, timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 50_000):
            yield big[i:i + 50_000]

    r = httpx.post(small.url + "/v1/chat/completions", content=chunks(), timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_context_length_exceeded_before_any_gpu_work(small):
    steps = small.state.engine.steps
    img = Image.new("RGB", (1000, 700))  # 576 + 1 + 864 local rows > 1024
    err = assert_error(post(small, {"model": MODEL, "messages": [image_message("hi", data_url(img))],
                                    "max_tokens": 10}), 400, code="context_length_exceeded")
    assert "1024" in err["message"]
    assert_error(post(small, hi(max_tokens=100, messages=[{"role": "user", "content": "word " * 1000}])), 400,
                 code="context_length_exceeded")
    assert small.state.engine.steps == steps


def test_request_limits(small):
    img = data_url(Image.new("RGB", (50, 50)))
    assert_error(post(small, {"model": MODEL, "messages": [image_message("x", img, img, img)]}), 400,
                 code="too_many_images")
    assert_error(post(small, hi(max_tokens=101)), 400, param="max_tokens")
    assert_error(post(small, hi(n=3)), 400, param="n")
    assert_error(post(small, hi(stop=["a", "b", "c"])), 400, param="stop")
    assert_error(post(small, hi(messages=[{"role": "user", "content": "x"}] * 5)), 400, param="messages")
    assert_error(post(small, hi(response_format={"type": "xml"})), 400, param="response_format.type")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


def test_pixel_bomb_refused_from_header_fast(small):
    png = _png_header_only(40000, 40000)
    assert len(png) < 4096
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    t0 = time.perf_counter()
    assert_error(post(small, {"model": MODEL, "messages": [image_message("x", url)]}), 400, code="image_too_large")
    assert time.perf_counter() - t0 < 1.0


def test_garbage_image_is_400(small):
    url = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    assert_error(post(small, {"model": MODEL, "messages": [image_message("x", url)]}), 400, code="invalid_image")
    assert_error(post(small, {"model": MODEL, "messages": [image_message("x", "data:image/png;base64,@@@")]}), 400)


def test_typed_image_tag_creates_no_placeholder(small):
    r = post(small, hi(messages=[{"role": "user", "content": "<image> <image>"}]))
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] < 100


def test_errors_are_counted_by_type_and_status(small):
    post(small, hi(n=3))
    assert small.metric("slime_errors_total", 'status="400"') >= 1


# -- image URLs ------------------------------------------------------------------------------------
class CountingServer:
    """A local HTTP listener that counts connections and serves a PNG (or a redirect)."""

    def __init__(self, body: bytes = b"", redirect: str | None = None):
        outer = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits += 1
                if redirect:
                    self.send_response(302)
                    self.send_header("Location", redirect)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 99, 199)).save(buf, "PNG")
    return buf.getvalue()


def test_http_urls_off_by_default_and_other_schemes_refused(small):
    target = CountingServer(_png())
    try:
        for url in (f"http://127.0.0.1:{target.port}/a.png", "file:///etc/passwd", "ftp://x/y.png", "/etc/passwd"):
            assert_error(post(small, {"model": MODEL, "messages": [image_message("x", url)]}), 400)
        assert target.hits == 0
    finally:
        target.close()


def test_url_fetching_guards(tiny_dir):
    good = CountingServer(_png())
    other = CountingServer(_png())
    hop = CountingServer(redirect=f"http://127.0.0.2:{other.port}/b.png")
    base = Settings(model=str(tiny_dir), device="cpu", allow_image_urls=True, image_url_domains=["localhost"])
    try:
        with LiveServer(base) as guarded, \
                LiveServer(base.model_copy(update={"image_url_allow_private": True})) as permissive:
            # loopback is refused by the address guard even when the name is allowed: no connection made
            url = f"http://localhost:{good.port}/a.png"
            assert_error(post(guarded, {"model": MODEL, "messages": [image_message("x", url)]}), 400,
                         code="image_url_refused")
            # a host outside the allow-list: refused before resolving
            assert_error(post(permissive, {"model": MODEL, "messages": [image_message(
                "x", f"http://127.0.0.1:{good.port}/a.png")]}), 400, code="image_url_refused")
            assert good.hits == 0
            # allowed and (in tests) private addresses let through: fetched
            r = post(permissive, {"model": MODEL, "messages": [image_message("x", url)], "max_tokens": 1})
            assert r.status_code == 200, r.text
            assert good.hits == 1 and r.json()["usage"]["prompt_tokens"] > 576
            # a redirect to a host outside the allow-list is checked again and refused
            r = post(permissive, {"model": MODEL, "messages": [image_message(
                "x", f"http://localhost:{hop.port}/r.png")]})
            assert_error(r, 400, code="image_url_refused")
            assert hop.hits == 1 and other.hits == 0
    finally:
        for s in (good, other, hop):
            s.close()


def test_url_fetch_byte_cap(tiny_dir):
    big = CountingServer(b"\x89PNG" + b"\0" * 400_000)
    try:
        with LiveServer(Settings(model=str(tiny_dir), device="cpu", allow_image_urls=True,
                                 image_url_allow_private=True, max_request_bytes=100_000)) as s:
            r = post(s, {"model": MODEL, "messages": [image_message("x", f"http://127.0.0.1:{big.port}/big.png")]})
            assert_error(r, 400, code="image_too_large")
    finally:
        big.close()


# -- access ----------------------------------------------------------------------------------------
def test_api_keys_and_cors(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", api_key=["k1", "k2"],
                             cors_origins=["https://app.example"])) as s:
        assert_error(post(s, hi()), 401, code="invalid_api_key")
        assert_error(post(s, hi(), headers={"Authorization": "Bearer nope"}), 401)
        assert post(s, hi(), headers={"Authorization": "Bearer k2"}).status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(s.url + path).status_code == 200
        pre = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        import openai

        c = openai.OpenAI(base_url=s.url + "/v1", api_key="k1", max_retries=0)
        assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                         max_tokens=1).choices


def test_cors_off_by_default(small):
    r = httpx.options(small.url + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


# -- runtime ---------------------------------------------------------------------------------------
def test_overload_is_429_and_admitted_requests_complete(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=1, max_waiting_requests=1)) as s:
        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                body = hi(max_tokens=64, ignore_eos=True)
                return await asyncio.gather(*(c.post(s.url + "/v1/chat/completions", json=body) for _ in range(6)))

        results = asyncio.run(main())
        codes = sorted(r.status_code for r in results)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        for r in results:
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["usage"]["completion_tokens"] == 64


def test_model_step_failure_fails_only_that_step_and_recovers(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu")) as s:
        engine = s.state.engine
        fired = []

        def once(stage, requests):
            if stage == "decode" and not fired:
                fired.append(1)
                raise RuntimeError("simulated transient CUDA error")

        # A failure nobody causes again (retrying the step succeeds) costs no request.
        engine.executor.fault_hook = once
        r = post(s, hi(max_tokens=5, ignore_eos=True))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5 and fired

        def always(stage, requests):
            if stage == "decode":
                raise RuntimeError("simulated CUDA error")

        engine.executor.fault_hook = always
        assert_error(post(s, hi(max_tokens=5)), 500)
        body = hi(max_tokens=5, stream=True)
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as resp:
            lines = [x for x in resp.iter_lines() if x]
        assert any('"error"' in x for x in lines) and lines[-1] == "data: [DONE]"
        engine.executor.fault_hook = None
        assert post(s, hi(max_tokens=3)).status_code == 200
        assert httpx.get(s.url + "/ready").status_code == 200
        assert s.metric("slime_num_requests_running") == 0


def test_dead_engine_loop_makes_ready_503(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu")) as s:
        s.state.engine.stop()
        assert httpx.get(s.url + "/ready").status_code == 503
        assert httpx.get(s.url + "/health").status_code == 503  # liveness fails: restart me
        assert_error(post(s, hi()), 503)


def test_abandoned_requests_leave_gauges_at_baseline(server):
    async def main():
        async with httpx.AsyncClient(timeout=30) as c:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500,
                    "ignore_eos": True, "stream": True}
            for _ in range(200):
                async with c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if '"content"' in line:
                            break

    asyncio.run(main())
    deadline = time.time() + 15
    while time.time() < deadline and (server.metric("slime_num_requests_running")
                                      or server.metric("slime_num_requests_waiting")):
        time.sleep(0.05)
    assert server.metric("slime_num_requests_running") == 0
    assert server.metric("slime_num_requests_waiting") == 0
    assert server.state.engine.num_requests == 0 and server.state.chat.preparing == 0


def test_health_and_metrics_stay_fast_while_large_images_are_preprocessed(tiny_dir):
    """The server in its own process (as deployed), four 4032 x 3024 uploads at once."""
    import io
    import json

    from tests.live import start_server_process

    proc, url = start_server_process(tiny_dir)
    try:
        # A 12-megapixel photo as phones send it (a few MB of JPEG); every pixel is decoded, resized
        # and normalised by the server.
        from bench.preprocess import photo

        buf = io.BytesIO()
        photo((4032, 3024)).save(buf, "JPEG", quality=92)
        image = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        body = json.dumps({"model": MODEL, "messages": [image_message("x", image)], "max_tokens": 1}).encode()
        latencies = []

        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                jobs = [asyncio.create_task(c.post(url + "/v1/chat/completions", content=body,
                                                   headers={"content-type": "application/json"}))
                        for _ in range(4)]
                i = 0
                while not all(j.done() for j in jobs):
                    t0 = time.perf_counter()
                    r = await c.get(url + ("/health" if i % 2 == 0 else "/metrics"))
                    assert r.status_code == 200
                    latencies.append(time.perf_counter() - t0)
                    i += 1
                    await asyncio.sleep(0.01)
                return [j.result().status_code for j in jobs]

        assert asyncio.run(main()) == [200] * 4
    finally:
        proc.terminate()
        proc.wait(30)
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert len(latencies) > 20 and p99 < 0.1, (p99, len(latencies))


def test_engine_stop_ends_in_flight_streams_instead_of_hanging(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu")) as s:
        body = hi(max_tokens=3000, ignore_eos=True, stream=True)
        lines = stream_lines(s.url, body, after=3, then=threading.Thread(target=s.state.engine.stop).start)
        assert any('"error"' in x and "shutting down" in x for x in lines)
        assert lines[-1] == "data: [DONE]"
