"""One CLI vocabulary: a shared option has one default and one help text in every command.

The parser of every subcommand (nested ones such as ``ppn bench speed`` included) is walked and
its actions collected per option string. A command that spelled ``--device`` itself with another
default (``cpu`` where the rest say ``auto``) fails here; the power check below builds such a parser.
"""

from __future__ import annotations

import argparse

import pytest

from ppn_bayes.cli import build_parser
from ppn_bayes.cli import options as shared

# option -> (default, help) that every command declaring it must use
SHARED = {
    "--quantile": (shared.QUANTILE, shared.QUANTILE_HELP),
    "--draws": (shared.DRAWS, shared.DRAWS_HELP),
    "--device": (shared.DEVICE, shared.DEVICE_HELP),
}
# ``ppn compare --seed`` seeds the peers' calibration draw and ``ppn calibrate --seed`` the chapters and
# price draws it samples (overriding the recipe's calibration.seed), not the posterior draws: another
# meaning, another help; everywhere else --seed is the posterior draws' seed.
OTHER_MEANING = {("compare", "--seed"), ("calibrate", "--seed")}


def commands(parser: argparse.ArgumentParser, prefix: str = ""):
    """``(name, parser)`` of every leaf subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from commands(child, f"{prefix} {name}".strip())


def violations(parser: argparse.ArgumentParser) -> list[str]:
    found = []
    for name, command in commands(parser):
        for action in command._actions:
            for flag in action.option_strings:
                if (name.split()[0], flag) in OTHER_MEANING:
                    continue
                if flag == "--seed":
                    want = (shared.SEED, shared.SEED_HELP)
                elif flag == "--json":
                    if not (action.default is False and action.help.startswith("print ")
                            and action.help.endswith(" as one JSON object")):
                        found.append(f"ppn {name} {flag}: {action.help!r}")
                    continue
                elif flag in SHARED:
                    want = SHARED[flag]
                else:
                    continue
                default = shared.QUANTILE if flag == "--quantile" and action.default is None else action.default
                if default != want[0] or not action.help.endswith(want[1]):
                    found.append(f"ppn {name} {flag}: default {action.default!r}, help {action.help!r}")
    return found


def test_every_command_uses_the_shared_options():
    assert violations(build_parser()) == []


def test_the_check_catches_a_command_with_its_own_device_default():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    sub.add_parser("good").add_argument("--device", default="auto", help=shared.DEVICE_HELP)
    sub.add_parser("drifted").add_argument("--device", default="cpu", help="device (default cpu)")
    assert violations(parser) == ["ppn drifted --device: default 'cpu', help 'device (default cpu)'"]


@pytest.mark.parametrize("command", ["keepset", "resize", "report", "uncertainty", "eval"])
def test_quantile_means_the_same_everywhere(command):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    (quantile,) = [a for a in sub.choices[command]._actions if "--quantile" in a.option_strings]
    assert quantile.help == shared.QUANTILE_HELP


def test_calibrate_units_are_the_data_units():
    """``ppn calibrate --unit`` spells the units out (the parser must not import torch); they are data's."""
    from ppn_bayes.data.corpus import UNITS

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    (unit,) = [a for a in sub.choices["calibrate"]._actions if "--unit" in a.option_strings]
    assert tuple(unit.choices) == UNITS


def test_json_answers_are_strict_json():
    """Every --json answer goes through json_text: an empty reliability bin's NaN (ppn uncertainty) or an
    infinite figure becomes null, so jq and strict parsers read it. Power: json.dumps as it was writes
    the bare token NaN, which a strict parser refuses."""
    import json
    import math

    import torch

    from ppn_bayes.analysis.uncertainty import reliability
    from ppn_bayes.cli.options import json_text

    rows = reliability(torch.tensor([0.05, 0.1]), torch.tensor([True, False]), bins=4)  # bins 2-4 empty
    rep = {"reliability": rows, "ratio": float("inf"), "n": 2, "nested": ({"x": -float("inf")},)}

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    back = strict(json_text(rep))
    assert back["reliability"][1]["confidence"] is None and back["ratio"] is None and back["nested"] == [{"x": None}]
    assert back["reliability"][0]["count"] == 2 and math.isclose(back["reliability"][0]["confidence"], 0.075, rel_tol=1e-6)  # float32 inputs
    with pytest.raises(ValueError):
        strict(json.dumps(rep))
