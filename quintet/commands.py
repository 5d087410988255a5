"""What every command shares: the error boundary and logging to stderr (each stage's `commands.py` holds
its own sub-commands; `quintet.cli` puts them together)."""

from __future__ import annotations

import argparse
import logging
import sys


def configure_logging() -> None:
    """INFO logs to stderr, unless the program configured logging itself."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")


def run_command(args: argparse.Namespace, prog: str = "quintet") -> int:
    """Run a parsed command's handler (`args.func`); an expected failure prints one line, exit code 2."""
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
