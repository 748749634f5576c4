"""The ``ppn`` command: thin subcommands over the public API.

Each subcommand lives in its own module under :mod:`ppn_bayes.cli` and exposes
``register(subparsers)``, which adds its parser and sets ``func``.  ``main`` only dispatches and turns
:class:`~ppn_bayes.errors.PPNError` into a one-line message with exit status 2.
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
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PPNError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
