"""Device selection and mixed precision, in one place so every command treats ``--device`` alike."""

from __future__ import annotations

import contextlib

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
