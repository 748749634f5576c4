"""Folders shipped with ppn-bayes: the recipes and the model cards, one copy each.

The recipes live in the repository's top-level ``inference/`` folder and the model cards in
``models/``: the layout users read, and the only copy. A wheel carries them as
``ppn_bayes/recipes`` and ``ppn_bayes/cards`` (``setup.py`` maps the folders into the package at build
time), so an installed ``ppn`` finds them next to its modules; a checkout (editable install, or
``PYTHONPATH`` at the repository) finds them one level up. Nothing is copied by hand.
"""

from __future__ import annotations

from pathlib import Path

from ppn_bayes.errors import ConfigError

# package folder (in a wheel) -> repository folder (in a checkout)
CHECKOUT_FOLDERS = {"recipes": "inference", "cards": "models"}


def shipped_folder(name: str) -> Path:
    """The folder of shipped ``recipes`` or ``cards``, in an installed wheel or in a checkout."""
    if name not in CHECKOUT_FOLDERS:
        raise ValueError(f"no shipped folder {name!r}; known: {', '.join(CHECKOUT_FOLDERS)}")
    package = Path(__file__).resolve().parent
    for folder in (package / name, package.parent / CHECKOUT_FOLDERS[name]):
        if folder.is_dir():
            return folder
    raise ConfigError(f"this ppn-bayes install has no {name} folder (looked in {package / name} and "
                      f"{package.parent / CHECKOUT_FOLDERS[name]}); reinstall it with `pip install ppn-bayes` "
                      "or from a full checkout")


def bundled_recipe(name: str) -> Path:
    """The path of a recipe shipped with the package (``inference/<name>.yaml``; see
    :func:`shipped_folder` for where an installed wheel keeps it)."""
    folder = shipped_folder("recipes")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"no bundled recipe {name!r}; bundled recipes: {', '.join(names)}")
    return path
