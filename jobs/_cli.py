"""Shared command-line plumbing for the jobs: logging setup and one clear error line on bad input."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from bpr_core.formats import InputError


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        code = main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
