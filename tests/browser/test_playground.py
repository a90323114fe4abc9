"""The playground in a real headless Chromium (Debian's), against the real server."""

import io
import shutil
import time

import httpx
import pytest

from tests.live import ROOT, LiveServer, photo
from tests.tools import missing_tool

pytestmark = pytest.mark.browser

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = ROOT / "artifacts" / "browser"


@pytest.fixture(scope="module")
def site(tiny_dir):
    from server.settings import Settings

    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_tokens_cap=4096)) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM or not DRIVER:
        missing_tool("Debian's chromium and chromium-driver are not installed (make browser-deps)")
    try:
        from selenium import webdriver
    except ImportError:
        missing_tool("selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, predicate, timeout=60, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate(driver)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def by_id(driver, i):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, i)


def fresh_page(driver, site):
    driver.get(site.url + "/")
    wait(driver, lambda d: by_id(d, "model").text.startswith("model: "), what="model name")
    by_id(driver, "clear").click()


VIEW, CELLS = 336, 12  # CLIP view side; local tokens per view side
TINT, KEEP_ALPHA, DIM_ALPHA = (255, 200, 0), 0.25, 0.55  # kept: tinted yellow; dropped: darkened


def server_mask(site, image, question: str) -> str:
    """The kept mask the server reports for this upload and question (`slime_selection`)."""
    import base64

    url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
    body = httpx.post(site.url + "/v1/chat/completions", timeout=120, json={
        "model": site.state.settings.model_id, "max_tokens": 1, "slime_selection": True, "messages": [
            {"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]}).json()
    return body["slime"]["images"][0]["kept_mask"]


def drawn_mask(driver, image, grid) -> str:
    """Read the overlay canvas's pixels and tell, cell by cell, whether the heat map tinted it
    (kept: 0.75 x photo + 0.25 x yellow) or dimmed it (dropped: 0.45 x photo), against the same
    photo drawn by the browser without the heat map (resized and padded as SliME slices it)."""
    import base64
    import math

    import numpy as np
    from PIL import Image

    cols, rows = grid
    w, h = Image.open(image).size
    tw, th = cols * VIEW, rows * VIEW
    sw, sh = tw / w, th / h
    nw, nh = (tw, min(math.ceil(h * sw), th)) if sw < sh else (min(math.ceil(w * sh), tw), th)
    x, y, scale = (tw - nw) // 2, (th - nh) // 2, min(1, 672 / tw)
    shown, plain, size = driver.execute_async_script("""
        const [x, y, nw, nh, tw, th, scale, done] = arguments;
        const canvas = document.querySelector("#overlays figure canvas");
        const im = new Image();
        im.onload = () => {
          const ref = document.createElement("canvas");
          ref.width = canvas.width; ref.height = canvas.height;
          const g = ref.getContext("2d");
          g.scale(scale, scale); g.fillStyle = "#000"; g.fillRect(0, 0, tw, th);
          g.drawImage(im, x, y, nw, nh);
          done([canvas.toDataURL("image/png"), ref.toDataURL("image/png"), [canvas.width, canvas.height]]);
        };
        im.src = document.querySelector("#messages li.user img").src;
    """, x, y, nw, nh, tw, th, scale)
    assert size == [round(tw * scale), round(th * scale)]

    def pixels(data_url: str):
        png = base64.b64decode(data_url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)

    shown, plain = pixels(shown), pixels(plain)
    n, across, margin = VIEW / CELLS, cols * CELLS, 4  # the margin keeps off the blue tile borders
    out = []
    for k in range(rows * CELLS * across):
        cx, cy = (k % across) * n * scale, (k // across) * n * scale
        cell = (slice(math.ceil(cy) + margin, math.floor(cy + n * scale) - margin),
                slice(math.ceil(cx) + margin, math.floor(cx + n * scale) - margin))
        ref = plain[cell]
        tinted = np.abs(shown[cell] - ((1 - KEEP_ALPHA) * ref + KEEP_ALPHA * np.array(TINT))).mean()
        dimmed = np.abs(shown[cell] - (1 - DIM_ALPHA) * ref).mean()
        assert min(tinted, dimmed) < 3 and max(tinted, dimmed) > 15, f"cell {k} is neither tinted nor dimmed"
        out.append("1" if tinted < dimmed else "0")
    return "".join(out)


def test_upload_ask_stream_and_overlay_matches_server(browser, site, tiny_lm):
    from model.generation import generate
    from model.images import load_image
    from model.sampling import SamplingParams
    from model.templates import Message

    fresh_page(browser, site)
    image = photo("extreme_ironing.jpg")
    by_id(browser, "file").send_keys(str(image))
    wait(browser, lambda d: d.find_elements("css selector", "#pending img"), what="image preview")
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("12")
    question = by_id(browser, "question")
    question.send_keys("What is unusual about this image?")
    question.send_keys("\n")
    text = wait(browser, lambda d: (d.find_elements("css selector", "#messages li.assistant .text") or [None])[-1],
                what="assistant message")
    wait(browser, lambda d: by_id(d, "send").is_enabled() and text.text, what="streamed answer")
    fig = wait(browser, lambda d: d.find_elements("css selector", "#overlays figure"), what="overlay")[0]
    ref = generate(tiny_lm, [Message("user", "What is unusual about this image?", 1)], [load_image(image)],
                   SamplingParams(max_tokens=12, temperature=0))
    report = ref.images[0]
    assert int(fig.get_attribute("data-kept")) == report.local_kept
    assert int(fig.get_attribute("data-cells")) == report.local_tokens
    # The heat map as drawn: each local token's cell tinted when the server kept it, dimmed when not.
    mask = server_mask(site, image, "What is unusual about this image?")
    assert len(mask) == report.local_tokens and mask.count("1") == report.local_kept
    assert drawn_mask(browser, image, report.grid) == mask
    assert str(report.local_kept) in fig.text and f"grid {report.grid[0]} x {report.grid[1]}" in fig.text
    assert text.text.strip() == ref.text
    assert by_id(browser, "prompt-tokens").text == str(ref.prompt_tokens)
    assert by_id(browser, "ttft").text.endswith("ms")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = browser.get_screenshot_as_png()
    (ARTIFACTS / "playground.png").write_bytes(png)
    from PIL import Image, ImageStat

    shot = Image.open(io.BytesIO(png)).convert("L")
    assert ImageStat.Stat(shot).stddev[0] > 10, "screenshot looks blank"


def test_the_stop_button_stays_put_while_an_answer_streams(browser, site):
    # the messages pane grew with the answer and pushed Stop down line by line: a moving target for
    # the user (and a click that landed on the answer's text instead)
    fresh_page(browser, site)
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("4000")
    by_id(browser, "question").send_keys("Tell me a very long story\n")
    text = wait(browser, lambda d: [e for e in d.find_elements("css selector", "#messages li.assistant .text")
                                    if len(e.text) > 20], what="streaming text")[-1]
    where = by_id(browser, "stop").rect
    start = len(text.text)
    wait(browser, lambda d: len(text.text) > start + 600, what="more text")
    assert by_id(browser, "stop").rect == where
    by_id(browser, "stop").click()
    wait(browser, lambda d: by_id(d, "send").is_enabled(), what="send re-enabled")


def test_stop_aborts_a_long_answer(browser, site):
    fresh_page(browser, site)
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("4000")
    by_id(browser, "temperature").clear()
    by_id(browser, "temperature").send_keys("1")
    by_id(browser, "question").send_keys("Tell me a very long story\n")
    text = wait(browser, lambda d: [e for e in d.find_elements("css selector", "#messages li.assistant .text")
                                    if len(e.text) > 20], what="streaming text")[-1]
    by_id(browser, "stop").click()
    wait(browser, lambda d: by_id(d, "send").is_enabled(), what="send re-enabled")
    length = len(text.text)
    time.sleep(0.5)
    assert len(text.text) == length  # nothing more arrives
    deadline = time.time() + 10
    while time.time() < deadline and site.metric("slime_num_requests_running"):
        time.sleep(0.1)
    assert site.metric("slime_num_requests_running") == 0


def test_api_error_is_rendered(browser, site):
    fresh_page(browser, site)
    by_id(browser, "max-tokens").clear()
    by_id(browser, "max-tokens").send_keys("99999")
    by_id(browser, "question").send_keys("hi\n")
    err = wait(browser, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error"), what="error box")
    expected = httpx.post(site.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999}).json()
    assert err.text == expected["error"]["message"]


def test_json_mode_answers_follow_the_schema_box(browser, site):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"caption": {"type": "string", "maxLength": 20},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["caption", "count"], "additionalProperties": False}
    fresh_page(browser, site)
    assert not by_id(browser, "json-schema").is_displayed()
    by_id(browser, "json-mode").click()
    box = wait(browser, lambda d: by_id(d, "json-schema").is_displayed() and by_id(d, "json-schema"),
               what="schema box")
    box.send_keys(json.dumps(schema))
    by_id(browser, "question").send_keys("Describe it\n")
    wait(browser, lambda d: by_id(d, "send").is_enabled() and d.find_elements("css selector", "#messages li.assistant"),
         what="the answer")
    answer = browser.find_elements("css selector", "#messages li.assistant .text")[-1].text
    jsonschema.validate(json.loads(answer), schema)  # random weights: only the grammar makes this valid
    box.clear()
    box.send_keys("{not json")
    by_id(browser, "question").send_keys("again\n")
    err = wait(browser, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error"), what="error box")
    assert "schema" in err.text


def test_page_is_self_contained_and_has_no_external_urls(site):
    for path in ("/", "/static/playground.js", "/static/playground.css"):
        body = httpx.get(site.url + path).text
        assert "http://" not in body and "https://" not in body, path


def test_readable_at_phone_width_and_keyboard_reachable(browser, site):
    browser.set_window_size(390, 844)
    try:
        fresh_page(browser, site)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        # the image picker, the question box and the buttons are in the tab order
        focusable = browser.execute_script(
            "return [...document.querySelectorAll('#drop, #question, #send, #clear, #temperature, #max-tokens,"
            " #api-key')].map(e => e.tabIndex >= 0)")
        assert all(focusable)
    finally:
        browser.set_window_size(1280, 900)
