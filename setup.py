"""Packaging beyond what pyproject.toml can say: the package list.

The recipes (``inference/``) and model cards (``models/``) are top-level folders of the repository,
where users look for them, and their only copy: the wheel carries them as the data packages
``ppn_bayes.recipes`` and ``ppn_bayes.cards`` (``package_dir`` maps them), so an installed
``ppn`` finds them without a second hand-kept copy. ``ppn_bayes.shipped`` resolves both layouts.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ppn_bayes", "ppn_bayes.*"]) + ["ppn_bayes.recipes", "ppn_bayes.cards"],
    package_dir={"ppn_bayes.recipes": "inference", "ppn_bayes.cards": "models"},
)
