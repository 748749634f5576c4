"""Schemas of the files ppn-bayes reads back, and the one validator that checks them on load.

Every file the tool writes and later reads again (a run's ``manifest.json``, ``posterior.json``,
``metrics.jsonl``, ``checkpoint/trainer.json``, its ``*.safetensors``, keep-set JSON files) can be
damaged, hand-edited or copied from elsewhere. Reading one trusts nothing: the bytes must be UTF-8,
the JSON must parse, and every field the code goes on to use is checked against a small schema
(type, range, finiteness, allowed values) *before* it is used. A safetensors file is checked from its
header first (``safe_open``: tensor names, shapes and dtypes, no data read) against the shapes the
reader expects (from the unit inventory, the guide's or push's own parameters), then loaded and
checked for NaN/inf. Whatever fails becomes one line: the file, the field, what was expected, at most
one short line of what was found, and the fix::

    runs/x/posterior.json: push.rate: must be > 0, got -1.0; the run directory is damaged: ...

Why a schema rather than ``try``/``except`` around the use: the use is often far away (a NaN read
from ``posterior.json`` surfaces as a ValueError inside a Pyro distribution, a wrong-shaped guide
tensor as a ``load_state_dict`` traceback), and a wrong *type* often does not fail at all (``True``
is the integer 1 to Python, ``int(1.7)`` is 1), so a bad file would give a silently wrong answer.

Values from the user (recipes, flags) go through :mod:`ppn_bayes.config`; its messages and these use
:func:`short`, which prints at most one line of the offending value and never walks a whole
structure (a YAML alias bomb's value is a few bytes of references but gigabytes when printed).
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppn_bayes.errors import PPNError, RunError

#: The fix named by errors about a damaged run file (resuming a finished run would rewrite nothing).
RUN_FIX = "the run directory is damaged: restore the file from a copy, or fit a new run (ppn fit RECIPE --out NEW_DIR)"

if TYPE_CHECKING:
    import torch

# ------------------------------------------------------------------------------------- short values

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 40, 40, 40


def short(value: Any, limit: int = 60) -> str:
    """A one-line repr of ``value``, at most ``limit`` characters, in bounded time (``reprlib`` looks at
    no more than a few levels and items of a container, however large or shared it is)."""
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------- specs


class Invalid(Exception):
    """A value does not match its spec: ``where`` (``push.rate``, ``heads[3]``), what was expected."""

    def __init__(self, where: str, expected: str, value: Any):
        super().__init__(where)
        self.where, self.expected, self.value = where, expected, value


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


@dataclass
class Spec:
    """Base of the specs: ``check(value, where)`` returns the value or raises :class:`Invalid`."""

    def check(self, value: Any, where: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class AnyValue(Spec):
    def check(self, value: Any, where: str) -> Any:
        return value


@dataclass
class Int(Spec):
    """An integer (``true``/``false`` and ``1.0`` are not), optionally in ``[lo, hi]``."""

    lo: int | None = None
    hi: int | None = None

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(where, "expected an integer", value)
        if self.lo is not None and value < self.lo:
            raise Invalid(where, f"must be >= {self.lo}", value)
        if self.hi is not None and value > self.hi:
            raise Invalid(where, f"must be <= {self.hi}", value)
        return value


@dataclass
class Num(Spec):
    """A finite number (an integer is one; a boolean is not), optionally ``> lo`` / ``>= lo``, ``<= hi``."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False  # lo itself excluded
    finite: bool = True

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise Invalid(where, "expected a number", value)
        if self.finite and not math.isfinite(value):
            raise Invalid(where, "must be a finite number", value)
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            raise Invalid(where, f"must be {'>' if self.open_lo else '>='} {self.lo:g}", value)
        if self.hi is not None and value > self.hi:
            raise Invalid(where, f"must be <= {self.hi:g}", value)
        return value


@dataclass
class Str(Spec):
    choices: tuple[str, ...] | None = None

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, str):
            raise Invalid(where, "expected a string", value)
        if self.choices is not None and value not in self.choices:
            raise Invalid(where, f"expected one of {', '.join(self.choices)}", value)
        return value


@dataclass
class Bool(Spec):
    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, bool):
            raise Invalid(where, "expected true or false", value)
        return value


@dataclass
class Opt(Spec):
    """``null`` or ``inner``."""

    inner: Spec

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)


@dataclass
class List(Spec):
    """A list of ``item`` (optionally of exactly ``length`` items)."""

    item: Spec
    length: int | None = None

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise Invalid(where, "expected a list", value)
        if self.length is not None and len(value) != self.length:
            raise Invalid(where, f"expected a list of {self.length} items", value)
        return [self.item.check(v, _join(where, i)) for i, v in enumerate(value)]


@dataclass
class Map(Spec):
    """A JSON object with string keys and values of one spec."""

    value: Spec = field(default_factory=AnyValue)

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise Invalid(where, "expected an object", value)
        return {k: self.value.check(v, _join(where, str(k))) for k, v in value.items()}


@dataclass
class Obj(Spec):
    """A JSON object: ``required`` keys must be present, ``optional`` ones are checked when present;
    other keys are kept unchecked (a newer ppn-bayes may add fields)."""

    required: dict[str, Spec] = field(default_factory=dict)
    optional: dict[str, Spec] = field(default_factory=dict)

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise Invalid(where, "expected an object", value)
        for key, spec in self.required.items():
            if key not in value:
                raise Invalid(_join(where, key), "is missing", None)
            spec.check(value[key], _join(where, key))
        for key, spec in self.optional.items():
            if key in value:
                spec.check(value[key], _join(where, key))
        return value


def validate(value: Any, spec: Spec, what: str, fix: str, error: type[PPNError] = RunError) -> Any:
    """``spec.check(value)``, with a mismatch turned into one line: ``WHAT: FIELD: EXPECTED, got V; FIX``."""
    try:
        return spec.check(value, "")
    except Invalid as bad:
        where = f"{bad.where}: " if bad.where else ""
        got = "" if bad.expected == "is missing" else f", got {short(bad.value)}"
        raise error(f"{what}: {where}{bad.expected}{got}; {fix}") from None


# ------------------------------------------------------------------------------------------- paths


def check_path(path: Path, error: type[PPNError] = RunError) -> None:
    """Fail on a path that is not valid UTF-8 (names with stray bytes from another encoding), naming the
    component: safetensors, transformers and JSON manifests need text paths, and without this check the
    first of them to fail blames whichever file it was opening."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        parts = Path(path).parts
        bad = next((p for p in parts if not _encodes(p)), str(path))
        raise error(f"the path {short(str(path))} has a name that is not valid UTF-8 ({short(bad)}); "
                    "rename that file or directory with UTF-8 characters only") from None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------------------------------- JSON


def read_text(path: Path, fix: str, error: type[PPNError] = RunError, missing: str | None = None) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is one line naming it."""
    path = Path(path)
    check_path(path, error)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path} is missing; {missing or fix}") from None
    except OSError as err:
        raise error(f"{path} cannot be read ({err.strerror or type(err).__name__}); {fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start}); {fix}") from None


def parse_json(text: str, what: str, fix: str, error: type[PPNError] = RunError) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{what} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {fix}") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to be a ppn-bayes file; {fix}") from None


def load_json(path: Path, spec: Spec, fix: str, error: type[PPNError] = RunError, missing: str | None = None) -> Any:
    """Read, parse and validate one JSON file (one-line errors naming the file and the field)."""
    path = Path(path)
    return validate(parse_json(read_text(path, fix, error, missing), str(path), fix, error), spec, str(path), fix,
                    error)


def load_jsonl(path: Path, spec: Spec, fix: str, error: type[PPNError] = RunError) -> list[Any]:
    """Every line of a JSON-lines file, each validated (the error names the line)."""
    path = Path(path)
    out = []
    for n, line in enumerate(read_text(path, fix, error).splitlines(), 1):
        if line.strip():
            where = f"{path} line {n}"
            out.append(validate(parse_json(line, where, fix, error), spec, where, fix, error))
    return out


# ------------------------------------------------------------------------------------------- tensors


def tensor_header(path: Path, fix: str, error: type[PPNError] = RunError, missing: str | None = None
                  ) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of a safetensors file, from its header alone (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_path(path, error)
    if not path.is_file():
        raise error(f"{path} is missing; {missing or fix}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for name in fh.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                sl = fh.get_slice(name)
                out[name] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise error(f"{path} is unreadable as safetensors ({reason}); {fix}") from None


def check_shapes(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], what: str, fix: str,
                 error: type[PPNError] = RunError, extra_ok: bool = False) -> None:
    """Tensor names and shapes of a file against what its reader expects: missing, unexpected and
    mis-shaped tensors are one line that names the first of each kind (:func:`tensor_mismatch`)."""
    missing = [k for k in want if k not in have]
    unexpected = [] if extra_ok else [k for k in have if k not in want]
    shaped = [(k, have[k], want[k]) for k in want if k in have and tuple(have[k]) != tuple(want[k])]
    tensor_mismatch(what, fix, missing, unexpected, shaped, error)


def tensor_mismatch(what: str, fix: str, missing: list[str], unexpected: list[str],
                    shaped: list[tuple[str, Any, Any]], error: type[PPNError] = RunError) -> None:
    """Raise one line ``WHAT : tensor mismatch: N missing (e.g. ...); M unexpected (...); K of the
    wrong shape (e.g. NAME: [file], expected [reader]); FIX`` unless all three lists are empty (the first
    example of each kind is the first name in sorted order, so the message is deterministic)."""
    if not (missing or unexpected or shaped):
        return
    missing, unexpected, shaped = sorted(missing), sorted(unexpected), sorted(shaped, key=lambda t: t[0])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0][:80]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0][:80]})")
    if shaped:
        k, got, want = shaped[0]
        parts.append(f"{len(shaped)} of the wrong shape (e.g. {k[:80]}: {list(got)}, expected {list(want)})")
    raise error(f"{what}: tensor mismatch: {'; '.join(parts)}; {fix}")


def load_tensors(path: Path, fix: str, want: dict[str, tuple[int, ...]] | None = None,
                 error: type[PPNError] = RunError, missing: str | None = None, extra_ok: bool = False,
                 finite: bool = True) -> dict[str, torch.Tensor]:
    """A safetensors file, checked from its header against ``want`` (names -> shapes) before any data is
    read, then loaded and checked for NaN/inf in floating-point tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    header = tensor_header(path, fix, error, missing)
    if want is not None:
        check_shapes({k: v[0] for k, v in header.items()}, want, str(path), fix, error, extra_ok)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise error(f"{path} is unreadable as safetensors ({reason}); {fix}") from None
    if finite:
        check_finite(tensors, str(path), fix, error)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], what: str, fix: str, error: type[PPNError] = RunError) -> None:
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise error(f"{what}: tensor {name} holds NaN or inf; {fix}")
