"""Safety (issue 7, item 4): nothing untrusted is loaded by accident.

These are static checks over the library's own source, done with the ``ast`` module rather than
regular expressions so that comments and strings cannot fool them (or trip them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "ppn_bayes"
FILES = sorted(SOURCE.rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


@pytest.fixture(scope="module")
def trees():
    return {path: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in FILES}


def test_source_tree_is_found():
    assert len(FILES) > 20


def test_torch_load_only_with_weights_only(trees):
    offenders = []
    for path, tree in trees.items():
        for call in _calls(tree):
            if _dotted(call.func) == "torch.load":
                value = _kw(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{path.name}:{call.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_yaml_only_through_the_safe_loader(trees):
    offenders = []
    for path, tree in trees.items():
        for call in _calls(tree):
            name = _dotted(call.func)
            if name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
                offenders.append(f"{path.name}:{call.lineno} {name}")
    assert not offenders, f"unsafe YAML loading: {offenders}"


def test_no_pickle_and_no_eval(trees):
    offenders = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                offenders.append(f"{path.name}:{node.lineno} {node.func.id}")
    assert not offenders, offenders


def test_trust_remote_code_is_never_switched_on_by_the_library(trees):
    """``trust_remote_code`` may be passed through from the user, but never hard-wired to True."""
    offenders = []
    for path, tree in trees.items():
        for call in _calls(tree):
            value = _kw(call, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                offenders.append(f"{path.name}:{call.lineno}")
        for node in ast.walk(tree):
            if isinstance(node, ast.arguments):
                pos = node.posonlyargs + node.args
                defaults = dict(zip([a.arg for a in pos][-len(node.defaults):] if node.defaults else [], node.defaults))
                defaults.update({a.arg: d for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None})
                d = defaults.get("trust_remote_code")
                if isinstance(d, ast.Constant) and d.value is True:
                    offenders.append(f"{path.name}: default trust_remote_code=True")
    assert not offenders, offenders


# torch.save is allowed only for optimizer/RNG/trainer state (never model weights), and only where
# the matching torch.load uses weights_only=True (checked above). Weights always go to safetensors.
TORCH_SAVE_ALLOWED = {"checkpoint_files.py": "optimizer state of a resumable checkpoint"}


def test_weights_are_written_only_as_safetensors(trees):
    offenders = []
    for path, tree in trees.items():
        for call in _calls(tree):
            if _dotted(call.func) == "torch.save" and path.name not in TORCH_SAVE_ALLOWED:
                offenders.append(f"{path.name}:{call.lineno}")
            if _dotted(call.func).endswith("save_pretrained"):
                value = _kw(call, "safe_serialization")
                if isinstance(value, ast.Constant) and value.value is False:
                    offenders.append(f"{path.name}:{call.lineno} save_pretrained(safe_serialization=False)")
    assert not offenders, f"non-safetensors writes (weights must use safetensors): {offenders}"
