"""What every cloudfs command line shares: errors become one line and an exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from cloudfs.errors import CloudfsError

log = logging.getLogger("cloudfs")


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body; a cloudfs error prints `prog: message` and exits with its
    code, an interrupt exits 130. Nothing else is caught: a bug shows its traceback."""
    try:
        return body() or 0
    except CloudfsError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
