"""The `flashbench` command line: one module per command, each with `add_parser(sub)` (its arguments) and the
function it calls into the library. Exit codes: 0 success, 1 a check or verdict failed, 2 input the user can fix (a
FlashbenchError, or an OSError naming the file), 3 a bug (with its traceback), 130 interrupted."""

from __future__ import annotations

import argparse
import sys
import traceback

from flashbench.reference import FlashbenchError

from . import (check_dense, compare, convert, generate, hardware, model, models, predictor, probe, reader_sweep,
               report, run, threshold_sweep, validate, window_sweep)
from .common import EXIT_BAD_INPUT, EXIT_BUG, check_json_path

COMMANDS = (run, report, compare, validate, hardware, probe, generate, convert, reader_sweep, predictor,
            window_sweep, threshold_sweep, model, models, check_dense)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashbench", description="Benchmark and validation suite for "
                                     "flash-offloaded, activation-sparse LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_json_path(args)
        return args.func(args)
    except FlashbenchError as e:
        print(f"flashbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a full disk, a read-only or unreadable place: the message names the file
        print(f"flashbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - not the user's input: a bug, shown whole
        traceback.print_exc()
        print(f"flashbench: internal error (a bug): please report it with the traceback above; exit {EXIT_BUG}",
              file=sys.stderr)
        return EXIT_BUG
