"""Device selection and mixed precision, in one place so every command treats ``--device`` alike.

Mixed precision covers the language model only. bf16 autocast is what makes a GPU fit fast, but
the statistical core must stay float32: the low-rank guide's capacitance matrix goes to
``cholesky`` (no bf16 kernel on CUDA, and CUDA autocast does not upcast it as CPU autocast does),
the prior's log densities and the push's thresholds move by ~1e-2 in bf16 (a visible shift of a
sigmoid at temperature 0.5), and the ELBO's reductions over a data set lose digits. So
:func:`autocast_context` wraps the LM's forward pass alone and :func:`full_precision` (context
manager and decorator) switches autocast off, on every device type, around everything else.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from ppn_bayes.errors import ConfigError

_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda``/``cuda:N`` without CUDA is a one-line error.

    Failing early matters: otherwise the user learns about the missing GPU from a stack trace deep
    inside the first ``.to(device)``, after the model has already been loaded.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but no CUDA device is available; use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
        return device
    raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(_CHOICES)} (or cuda:N)")


def autocast_context(device: torch.device | str, dtype: torch.dtype | None = torch.bfloat16) -> contextlib.AbstractContextManager:
    """bf16 (or ``dtype``) autocast on CUDA; a no-op on CPU, where autocast is slower than float32."""
    device = torch.device(device)
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously: a timer read without this
    measures how fast kernels are launched, not how fast they run); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off (CPU and CUDA) inside, restored after; a no-op where it is off already.

    Set through ``torch.set_autocast_enabled`` rather than ``torch.autocast(..., enabled=False)``,
    which warns on every call on a machine without CUDA.
    """
    saved = {d: torch.is_autocast_enabled(d) for d in AUTOCAST_DEVICE_TYPES}
    if not any(saved.values()):
        yield
        return
    try:
        for d in AUTOCAST_DEVICE_TYPES:
            torch.set_autocast_enabled(d, False)
        yield
    finally:
        for d, on in saved.items():
            torch.set_autocast_enabled(d, on)


def fp32(fn: F) -> F:
    """Decorator: run ``fn`` under :func:`full_precision` (the guide, the prior, the push)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with full_precision():
            return fn(*args, **kwargs)

    wrapper.__full_precision__ = True  # what tests/test_fake_devices.py checks, structurally
    return wrapper  # type: ignore[return-value]
