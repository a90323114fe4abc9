"""`python -m server.batch`: an OpenAI Batch file of 200 lines with a few bad ones, killed part-way
and run again: every good line answered exactly once, every bad line reported, the rerun runs only
what was missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live import ROOT

MODEL = "tiny"
BAD = {  # custom_id ("line-?": none can be read) -> (the line, the status it gets: None = not a request)
    "line-?json": ('{"custom_id": "bad-json", "method": "POST", ', None),
    "line-?id": ('{"method": "POST", "url": "/v1/chat/completions", "body": {}}', None),
    "bad-url": (json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}), None),
    "bad-field": (json.dumps({"custom_id": "bad-field", "method": "POST", "url": "/v1/chat/completions",
                              "body": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                       "surprise": 1}}), 400),
    "too-long": (json.dumps({"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 10**7}}), 400),
    "other-model": (json.dumps({"custom_id": "other-model", "method": "POST", "url": "/v1/responses",
                                "body": {"model": "gpt-4o", "input": "x"}}), 404),
    "streamed": (json.dumps({"custom_id": "streamed", "method": "POST", "url": "/v1/responses",
                             "body": {"model": MODEL, "input": "x", "stream": True}}), 400),
}


def _good(i: int) -> dict:
    if i % 2:
        body = {"model": MODEL, "input": f"question {i}", "max_output_tokens": 8, "ignore_eos": True,
                "temperature": 0}
        return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/responses", "body": body}
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 8,
            "ignore_eos": True, "temperature": 0}
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def _command(tiny_dir: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.batch", str(inp), str(out), "--model", str(tiny_dir), "--device", "cpu",
            "--served-model-name", MODEL, "--no-progress", *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_a_killed_batch_resumes_and_reports_bad_lines(tiny_dir, tmp_path):
    good = [_good(i) for i in range(200 - len(BAD) - 1)]
    lines = [json.dumps(g) for g in good]
    for k, (line, _) in enumerate(BAD.values()):
        lines.insert(20 * k + 5, line)
    lines.insert(100, json.dumps(good[3]))  # a repeated custom_id
    assert len(lines) == 200
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # first run: one line at a time, killed once some are written
    proc = subprocess.Popen(_command(tiny_dir, inp, out, "--concurrency", "1"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 30):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    first = _records(out)
    assert 30 <= len(first) < 200
    with out.open("a") as f:  # as if killed in the middle of writing a line
        f.write('{"id": "batch_req_x", "custom_id": "q199"')

    rerun = subprocess.run(_command(tiny_dir, inp, out), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(first)} already in" in rerun.stderr
    records = _records(out)  # the partial line was dropped, then written whole
    by_id: dict[str, list[dict]] = {}
    for r in records:
        by_id.setdefault(r["custom_id"], []).append(r)
        assert r["id"].startswith("batch_req_")

    for g in good:  # each good line answered once (its repeat is the only second record)
        (answer,) = [r for r in by_id[g["custom_id"]] if r["response"] and r["response"]["status_code"] == 200]
        body = answer["response"]["body"]
        if g["url"] == "/v1/responses":
            assert body["object"] == "response" and body["usage"]["output_tokens"] == 8
        else:
            assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 8
        assert answer["error"] is None
    (dup,) = [r for r in by_id[good[3]["custom_id"]] if r["error"]]
    assert dup["error"]["code"] == "duplicate_custom_id" and dup["response"] is None

    for cid, (_, status) in BAD.items():
        if cid.startswith("line-?"):  # named by its line number
            cid = "line-" + str(next(i for i, line in enumerate(lines, 1) if line == BAD[cid][0]))
        (r,) = by_id[cid]
        if status is None:  # not a request
            assert r["response"] is None and r["error"]["code"] and r["error"]["message"]
        else:  # the API's own answer
            assert r["response"]["status_code"] == status and r["response"]["body"]["error"]["message"]
    assert len(records) == 200  # nothing answered twice across the kill

    again = subprocess.run(_command(tiny_dir, inp, out), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "0 to run" in again.stderr and len(_records(out)) == 200
