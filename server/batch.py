"""`python -m server.batch INPUT.jsonl OUTPUT.jsonl [server flags]`: an OpenAI Batch file run offline
on the same engine (continuous batching: many lines in flight at once), as `vllm run-batch` does.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/responses",
"body"}`. Each output line is `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`, written as soon as its request ends (so output order is completion order):
- an answered line: status 200 and the API's response body;
- a request the API refuses (a bad body, a context too long, a model error): its status and the
  API's error body, as the HTTP API would answer it;
- a line that is not a request at all (not JSON, no custom_id, another method or url, a repeated
  custom_id): `response` null and `error` {code, message, line} (its line number in INPUT).
One bad line never stops the rest. Resumable: the custom_ids (and bad lines) already in OUTPUT are
skipped (a line cut off by a kill is dropped first), so a rerun after a kill finishes only what was
missing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import APIError

log = logging.getLogger("slime.batch")
ROUTES = ("/v1/chat/completions", "/v1/responses")


@dataclass
class Line:
    number: int  # 1-based, in INPUT
    custom_id: str
    url: str = ""
    body: Any = None
    error: dict[str, str] | None = None  # not a request: why


@dataclass
class Summary:
    answered: int = 0
    refused: int = 0  # the API answered with an error
    invalid: int = 0  # not a request
    skipped: int = 0  # already in OUTPUT
    by_status: dict[int, int] = field(default_factory=dict)


def read_lines(path: Path) -> list[Line]:
    """INPUT's lines (blank ones skipped), each parsed as far as it goes."""
    out: list[Line] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            out.append(_parse_line(number, raw, seen))
    return out


def _parse_line(number: int, raw: str, seen: set[str]) -> Line:
    fallback = f"line-{number}"
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return Line(number, fallback, error={"code": "invalid_json", "message": f"line {number} is not valid JSON"})
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
        return Line(number, fallback, error={"code": "missing_custom_id",
                                             "message": f"line {number} needs a custom_id (a non-empty string)"})
    cid = obj["custom_id"]
    if cid in seen:
        return Line(number, cid, error={"code": "duplicate_custom_id",
                                        "message": f"custom_id {cid!r} (line {number}) was used by an earlier line"})
    seen.add(cid)
    if obj.get("method", "POST") != "POST":
        return Line(number, cid, error={"code": "invalid_method", "message": "method must be POST"})
    if obj.get("url") not in ROUTES:
        return Line(number, cid, error={"code": "invalid_url", "message": f"url must be one of {', '.join(ROUTES)}"})
    return Line(number, cid, obj["url"], obj.get("body"))


def done(path: Path) -> tuple[set[str], set[int]]:
    """What OUTPUT already holds: the custom_ids of requests that ran, and the line numbers of lines
    reported as not a request (a repeated custom_id names another line's id). A last line cut off
    by a kill is removed, so that the rerun writes it whole."""
    if not path.exists():
        return set(), set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    ids, numbers = set(), set()
    for raw in data[:end].splitlines():
        try:
            record = json.loads(raw)
            if record.get("error") and "line" in record["error"]:
                numbers.add(int(record["error"]["line"]))
            else:
                ids.add(record["custom_id"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return ids, numbers


def pending(lines: list[Line], output: Path) -> list[Line]:
    """The lines that OUTPUT does not answer yet."""
    ids, numbers = done(output)
    return [line for line in lines if (line.number not in numbers if line.error else line.custom_id not in ids)]


class BatchRunner:
    """Runs lines through the API's services (`chat`: server.chat.ChatService) with up to
    `concurrency` in flight; a line the server is too busy for (429) waits and goes again."""

    def __init__(self, chat, out, *, concurrency: int, progress=None):
        from .responses import ResponsesService

        self.chat = chat
        self.responses = ResponsesService(chat)
        self.out = out  # a text file opened for appending
        self.concurrency = concurrency
        self.progress = progress
        self.summary = Summary()

    async def run(self, lines: list[Line]) -> Summary:
        todo = iter(lines)  # shared by the workers: each takes the next line when it is free

        async def worker() -> None:
            for line in todo:
                await self._one(line)

        await asyncio.gather(*(worker() for _ in range(max(1, self.concurrency))))
        return self.summary

    async def _one(self, line: Line) -> None:
        if line.error is not None:
            self.summary.invalid += 1
            return self._write(line, None, {**line.error, "line": line.number})
        status, body = await self._answer(line)
        self.summary.by_status[status] = self.summary.by_status.get(status, 0) + 1
        if status == 200:
            self.summary.answered += 1
        else:
            self.summary.refused += 1
        self._write(line, {"status_code": status, "request_id": "req_" + uuid.uuid4().hex, "body": body}, None)

    async def _answer(self, line: Line) -> tuple[int, Any]:
        from .protocol import ChatCompletionRequest
        from .responses_protocol import ResponsesRequest
        from .routes.body import validate_data

        while True:
            try:
                if line.url == "/v1/chat/completions":
                    req = validate_data(line.body, ChatCompletionRequest)
                    self._no_stream(req.stream)
                    return 200, json.loads((await self.chat.complete(req)).model_dump_json(exclude_unset=True))
                req = validate_data(line.body, ResponsesRequest)
                self._no_stream(req.stream)
                return 200, await self.responses.create(req)
            except APIError as e:
                if e.status == 429 or e.code == "retry":  # busy: wait for room, then go again
                    await asyncio.sleep(0.05)
                    continue
                return e.status, e.body()
            except Exception as e:  # noqa: BLE001 - a failing line fails alone
                log.exception("line %d failed", line.number)
                return 500, APIError(500, f"internal error: {type(e).__name__}", type="server_error").body()

    @staticmethod
    def _no_stream(stream: bool) -> None:
        if stream:
            raise APIError(400, "stream is not supported in a batch", param="stream")

    def _write(self, line: Line, response: dict | None, error: dict | None) -> None:
        record = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": line.custom_id, "response": response,
                  "error": error}
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()  # a kill loses at most the line being written
        if self.progress is not None:
            self.progress.update(1)


def main(argv: list[str] | None = None) -> int:
    from .settings import settings_from, settings_parser

    ap = settings_parser("python -m server.batch", "Run an OpenAI Batch JSONL file on a SliME engine "
                                                   "(any server flag applies)")
    ap.add_argument("input", type=Path, help="OpenAI Batch JSONL: custom_id, method, url, body per line")
    ap.add_argument("output", type=Path, help="results JSONL (appended to; lines already there are skipped)")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="lines in flight at once (0: the engine's batch size plus its waiting queue)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    settings = settings_from(args)
    from .logs import configure_logging

    configure_logging(settings)
    lines = read_lines(args.input)
    todo = pending(lines, args.output)
    print(f"{len(lines)} lines, {len(lines) - len(todo)} already in {args.output}, {len(todo)} to run",
          file=sys.stderr)
    if not todo:
        return 0
    concurrency = args.concurrency or settings.max_batch_size + settings.max_waiting_requests
    summary = asyncio.run(_run(settings, todo, args.output, concurrency, progress=not args.no_progress))
    summary.skipped = len(lines) - len(todo)
    print(json.dumps({"answered": summary.answered, "refused": summary.refused, "invalid": summary.invalid,
                      "skipped": summary.skipped, "by_status": summary.by_status}), file=sys.stderr)
    return 0


async def _run(settings, todo: list[Line], output: Path, concurrency: int, *, progress: bool) -> Summary:
    from .app import build_service
    from .metrics import Metrics

    chat, engine = await asyncio.to_thread(build_service, settings, Metrics())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="req", file=sys.stderr)
    try:
        with output.open("a", encoding="utf-8") as out:
            return await BatchRunner(chat, out, concurrency=concurrency, progress=bar).run(todo)
    finally:
        if bar is not None:
            bar.close()
        await asyncio.to_thread(engine.stop)


if __name__ == "__main__":
    sys.exit(main())
