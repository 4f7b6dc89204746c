"""Shared command-line plumbing for the jobs: logging setup and one clear error line on bad input."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from bpr_core.formats import InputError, JobFailed


def prog_name(module: str) -> str:
    """How a job names itself in --help and usage errors: `bpr X` under the bpr command, else
    `python -m jobs.X` (what `ray job submit` runs)."""
    return f"bpr {module.replace('_', '-')}" if os.environ.get("BPR_CLI") else f"python -m jobs.{module}"


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        code = main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
