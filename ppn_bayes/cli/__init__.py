"""The ``ppn`` command: thin subcommands over the public API.

Each subcommand lives in its own module under :mod:`ppn_bayes.cli` and exposes
``register(subparsers)``, which adds its parser and sets ``func``.  ``main`` only dispatches and turns
:class:`~ppn_bayes.errors.PPNError` into a one-line message with exit status 2.

An :class:`OSError` that reaches this boundary (a disk that filled up during the work, a permission
changed under a running command) is the user's environment, not a bug: it is printed the same way,
``error: <what> <path>: <strerror>; <fix>`` (:func:`ppn_bayes.files.os_error_message`), exit status 2.
stdout is flushed inside the boundary too, so ``--json > file`` on a full disk is one such line
rather than an error at interpreter exit; a reader that closed the pipe early (``| head``) ends the
command quietly with status 141, like any shell tool.
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
    "calibrate",
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
    from ppn_bayes.files import os_error_message

    out = sys.stdout
    sys.stdout = _Stdout(out)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # --json to a full disk fails here, not at interpreter exit
        return code
    except PPNError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except StdoutError as failure:
        _silence(out)
        if isinstance(failure.err, BrokenPipeError):
            return EPIPE_EXIT
        print(f"error: {os_error_message(failure.err, 'cannot write to standard output')}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = out


#: The reader of stdout went away (``ppn models list | head -1``): nothing is wrong, nothing to say;
#: the status a shell tool killed by SIGPIPE has.
EPIPE_EXIT = 141


class StdoutError(Exception):
    """Writing the command's output to stdout failed (``err``): told apart from the command's own files."""

    def __init__(self, err: OSError):
        super().__init__(str(err))
        self.err = err


class _Stdout:
    """``sys.stdout`` during a command: the same stream, whose failures raise :class:`StdoutError`."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            raise StdoutError(err) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            raise StdoutError(err) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _silence(stream) -> None:
    """Point a failed stdout at /dev/null, so that the flush at interpreter exit does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (captured in tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
