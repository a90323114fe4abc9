"""`python -m server` / `slime-serve`: parse settings, configure logging, serve."""

from __future__ import annotations

import json
import logging
import sys


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def main(argv: list[str] | None = None) -> int:
    from .serve import serve
    from .settings import parse_args

    settings = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if settings.log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
