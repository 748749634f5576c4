"""The ``ppn`` command: thin subcommands over the public API.

Each subcommand lives in its own module under :mod:`ppn_bayes.cli` and exposes
``register(subparsers)``, which adds its parser and sets ``func``.  ``main`` only dispatches and turns
:class:`~ppn_bayes.errors.PPNError` into a one-line message with exit status 2.

An :class:`OSError` that reaches this boundary (a disk that filled up during the work, a permission
changed under a running command) is the user's environment, not a bug: it is printed the same way,
``error: <what> <path>: <strerror>; <fix>`` (:func:`ppn_bayes.files.os_error_message`), exit status 2.
The commands remove their partial outputs on the way out; the foreseeable cases are refused before
the work starts (:func:`ppn_bayes.files.check_writable`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ppn_bayes.errors import PPNError

# One module per subcommand (group); the order is the order of ``ppn --help``.
COMMANDS = [
    "demo",
    "models",
    "eval",
    "compare",
    "bench",
    "speculate",
    "fit",
    "keepset",
    "resize",
    "report",
    "uncertainty",
]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``error: ppn CMD: ...``) with exit status 2,
    like every other user error; subcommand parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ppn",
        description="Push puppet networks: Bayesian structured pruning of causal language models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ppn_bayes.cli.{name}_cmd").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from ppn_bayes.version import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        print(f"error: ppn: no command given; choose one of {', '.join(COMMANDS)} (e.g. `ppn demo`), "
              "see `ppn --help`", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except PPNError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        from ppn_bayes.files import os_error_message

        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
