"""`python -m server` / `slime-serve`: parse settings, configure logging, serve."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .logs import configure_logging
    from .serve import serve
    from .settings import parse_args

    settings = parse_args(argv)
    configure_logging(settings)
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
