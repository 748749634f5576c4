"""The safetensors files of a checkpoint: which they are, their headers, lazy reads, a streaming write.

:func:`weight_files` names the files ``from_pretrained(..., use_safetensors=True)`` reads (the shards of
``model.safetensors.index.json``, the one place that index is read, else ``model.safetensors``);
:func:`check_checkpoint` checks a directory is a complete checkpoint from the headers alone
(:func:`read_safetensors_header`), so a truncated download fails in one line before any load.

:class:`LazyCheckpoint` never loads a model. It opens a checkpoint's safetensors file(s) with
``safe_open`` (:func:`weight_map` says which file holds which tensor) and reads whole tensors, or only
the entries of an index set along one axis: ``get_slice`` over contiguous runs (:func:`runs`), so a
run of adjacent heads is one read. What is never asked for is never touched, so the peak memory of a
resize is proportional to the kept size, not the base size (``benchmarks/resize_memory.py`` measures
it). :func:`save_streaming` writes a safetensors file one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ppn_bayes.errors import ModelError
from ppn_bayes.schema import check_path


def read_safetensors_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    """Read and sanity-check a safetensors header without touching the tensor data.

    Checking the header against the file size catches a truncated download in microseconds, with a
    message that names the file, instead of a deep error from the loader.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length beyond end of file")
            raw = fh.read(n)
        header = json.loads(raw)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes but the header needs {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise ModelError(f"weights file {path} is truncated or corrupt ({err}); delete it and fetch again "
                         "(for an alias: ppn models fetch ALIAS --force)") from None
    return raw, header


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, exactly those ``from_pretrained(..., use_safetensors=True)``
    reads: the shards named by ``model.safetensors.index.json``, else ``model.safetensors``. Nothing else
    in the folder counts (another ``*.safetensors`` file next to a pickle does not make it loadable)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            files = [path / s for s in shards]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelError(f"{index} is not a valid weights index ({str(err)[:80]}); fetch the model again") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{path} lacks weight shard(s) {', '.join(missing[:3])}; fetch the model again")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        also = f" ({pickles[0]} is a pickle and is never loaded)" if pickles else ""
        raise ModelError(f"no safetensors weights (model.safetensors or model.safetensors.index.json) in {path}"
                         f"{also}; ppn-bayes loads safetensors checkpoints only (convert with transformers' "
                         "save_pretrained)")
    return [single]


def check_checkpoint(path: Path) -> list[Path]:
    """Raise a one-line ModelError unless ``path`` looks like a complete checkpoint; return its weights."""
    check_path(path, ModelError)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json, so it is not a transformers checkpoint; "
                         "pass the directory written by save_pretrained, an alias or a Hub id")
    files = weight_files(path)
    for f in files:
        read_safetensors_header(f)
    return files


def weight_map(base: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file: the files :func:`check_checkpoint` accepts (the
    index's shards, else ``model.safetensors``), read by header."""
    out: dict[str, Path] = {}
    for f in check_checkpoint(base):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                out[name] = f
    return out


def runs(indices: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as ``[start, stop)`` pairs, in order (repeats start a new run).

    Reading a run is one contiguous ``get_slice`` read; heads are ``head_dim`` wide and kept heads are
    often adjacent, so a cut is a handful of reads rather than one per row.
    """
    out: list[tuple[int, int]] = []
    for i in indices.tolist():
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class LazyCheckpoint:
    """Read whole tensors, or index sets along one axis, from safetensors file(s), counting bytes.

    Each read opens its file, reads, and closes it again: ``safe_open`` memory-maps the file, and the
    pages a read touches stay resident (and count in RSS) while the map is open. Reopening costs
    one header parse per tensor (microseconds) and keeps the peak memory of a resize at the kept
    tensors themselves.
    """

    def __init__(self, base: Path):
        self.where = weight_map(base)
        self.bytes_read = 0

    def names(self) -> list[str]:
        return list(self.where)

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[Any]:
        with safe_open(str(self.where[name]), framework="pt") as fh:
            yield fh

    def shape(self, name: str) -> list[int]:
        with self._open(name) as fh:
            return list(fh.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        with self._open(name) as fh:
            t = fh.get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_index(self, name: str, axis: int, indices: torch.Tensor) -> torch.Tensor:
        """Only the entries ``indices`` along ``axis`` (contiguous runs read with ``get_slice``)."""
        with self._open(name) as fh:
            sl = fh.get_slice(name)
            shape = list(sl.get_shape())
            parts = []
            for a, b in runs(indices):
                key = tuple(slice(a, b) if d == axis else slice(None) for d in range(len(shape)))
                parts.append(sl[key])
            if not parts:  # nothing kept along this axis (callers skip such tensors; be total anyway)
                shape[axis] = 0
                parts.append(torch.empty(shape, dtype=_DTYPES.get(sl.get_dtype(), torch.float32)))
        self.bytes_read += sum(p.numel() * p.element_size() for p in parts)
        return torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]


_CODES = {v: k for k, v in _DTYPES.items()}


def save_streaming(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor, emptying ``tensors`` as it goes.

    ``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy, doubling the peak
    memory of an export. The format is simple (8-byte little-endian header length, a JSON header of
    dtype/shape/offsets padded to 8 bytes, then the raw data in header order), so we write the header
    from shapes alone and then each tensor's buffer directly; the result is read back by
    ``safetensors`` itself in every test.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _CODES:
            raise ModelError(f"cannot write tensor {name} of dtype {t.dtype} to safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            t = tensors.pop(name).detach().cpu().contiguous()
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
        fh.flush()
        os.fsync(fh.fileno())
