"""Recipes: strict validation (unknown keys, wrong types, ranges), --set overrides, the paper preset,
and every shipped recipe in inference/ loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppn_bayes.config import apply_overrides, dump_recipe, load_recipe, recipe_from_dict
from ppn_bayes.errors import ConfigError

INFERENCE = Path(__file__).resolve().parents[1] / "inference"


@pytest.mark.parametrize("data, match", [
    ({"train": {"stepz": 3}}, r"unknown key train\.stepz; valid keys here: .*steps"),
    ({"trian": {}}, r"unknown key trian"),
    ({"train": {"lr_guide": "fast"}}, r"train\.lr_guide: expected a number, got 'fast'"),
    ({"train": {"steps": 2.5}}, r"train\.steps: expected an integer"),
    ({"train": {"steps": True}}, r"train\.steps: expected an integer"),
    ({"train": {"weights": "half"}}, r"train\.weights: expected one of 'frozen', 'lora', 'full'"),
    ({"units": {"kinds": ["layers", "experts"]}}, r"units\.kinds"),
    ({"train": {"steps": 0}}, r"train\.steps: must be >= 1"),
    ({"push": {"p_dense": 1.0}}, r"push\.p_dense"),
    ({"push": {"init_half_price": 0}}, r"push\.init_half_price"),
    ({"push": {"init": "quadratic"}}, r"push\.init"),
    ({"train": {"betas": [0.9]}}, r"train\.betas"),
    ({"train": {"eval_lambdas": [0.5, -1]}}, r"train\.eval_lambdas"),
    ({"train": {"distributed": "horovod"}}, r"train\.distributed"),
    ({"train": {"device": "tpu"}}, r"train\.device"),
    ({"train": 3}, r"train: expected a mapping"),
    ({"data": {"bootstrap_seed": -1}}, r"data\.bootstrap_seed: a seed must be a whole number"),
    ({"data": {"bootstrap_seed": 1.5}}, r"data\.bootstrap_seed: expected an integer or null"),
    ({"data": {"bootstrap_unit": "pages"}}, r"data\.bootstrap_unit: expected one of 'chapters', 'documents'"),
    ([1, 2], r"a recipe must be a mapping"),
])
def test_bad_recipes_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict(data)


def test_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(bad)
    assert "\n" not in str(err.value) and "line" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain:\n  steps: 10\n")
    r = load_recipe(path, ["train.steps=20", "train.lr_guide=1e-3", "units.kinds=[layers, heads]",
                           "data.train_blocks=null", "train.weights=lora"])
    assert r.train.steps == 20 and r.train.lr_guide == 0.001 and r.units.kinds == ["layers", "heads"]
    assert r.data.train_blocks is None and r.train.weights == "lora" and r.name == "x"
    with pytest.raises(ConfigError, match="unknown key train.stepz"):
        load_recipe(path, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_recipe(path, ["train.steps=many"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])
    base = {"train": {"steps": 1}}
    apply_overrides(base, ["train.steps=5"])
    assert base == {"train": {"steps": 1}}  # the input mapping is not modified


def test_paper_preset_and_its_overrides():
    r = recipe_from_dict({"preset": "paper"})
    assert r.prior.kind == "none" and r.units.kinds == ["heads", "groups"] and r.units.group_size == 1
    assert r.push.rate == 0.3 and r.push.temperature == 0.5 and r.push.control_points == 10 and r.push.amplitude
    assert r.train.betas == [0.9, 0.95] and r.train.weight_decay == 0.1 and r.train.schedule == "cosine"
    r2 = recipe_from_dict({"preset": "paper", "units": {"group_size": 8}})
    assert r2.units.group_size == 8 and r2.units.kinds == ["heads", "groups"]  # recipe keys win, preset fills in


def test_dumped_recipe_round_trips(tmp_path):
    r = recipe_from_dict({"preset": "paper", "train": {"steps": 7}})
    path = tmp_path / "snap.yaml"
    path.write_text(dump_recipe(r))
    assert load_recipe(path) == r


@pytest.mark.parametrize("path", sorted(INFERENCE.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.name == path.stem


def test_the_expected_recipes_ship():
    names = {p.name for p in INFERENCE.glob("*.yaml")}
    assert {"smollm2-demo.yaml", "smollm2-full.yaml", "smollm2-paper.yaml", "llama-3.2-1b-gpu.yaml",
            "qwen2.5-1.5b-gpu.yaml", "smollm2-distill.yaml"} <= names
