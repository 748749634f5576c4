"""Posterior predictive over sub-networks: MI, variation ratio, AUROC, ECE, and the model-level path."""

from __future__ import annotations

import math

import pytest
import torch

from ppn_bayes.analysis.uncertainty import (
    auroc,
    ece,
    entropy,
    evaluate_keepset,
    mixture_logp,
    mutual_information,
    predictive_uncertainty,
    reliability,
    variation_ratio,
)
from ppn_bayes.backbone.gated import gate
from ppn_bayes.bayes.keepsets import KeepsetSolver
from ppn_bayes.bayes.posterior import Posterior
from tests.posterior_fixtures import make_run_dir
from tests.tiny_models import VOCAB, tiny_model


def test_mi_zero_for_identical_members_and_nonnegative():
    gen = torch.Generator().manual_seed(0)
    one = torch.log_softmax(torch.randn(5, 7, generator=gen, dtype=torch.float64), -1)
    same = one.expand(4, 5, 7)
    assert torch.allclose(mutual_information(same), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.all(variation_ratio(same) == 0)
    diff = torch.log_softmax(torch.randn(4, 5, 7, generator=gen, dtype=torch.float64), -1)
    assert torch.all(mutual_information(diff) >= 0)
    assert torch.all(mutual_information(diff) > 0)


def test_mi_by_hand():
    """Two members, two classes: p1 = (1, 0), p2 = (0, 1): H[mean] = log 2, mean H = 0, MI = log 2."""
    logp = torch.log(torch.tensor([[[1.0 - 1e-12, 1e-12]], [[1e-12, 1.0 - 1e-12]]], dtype=torch.float64))
    assert float(mutual_information(logp)[0]) == pytest.approx(math.log(2), abs=1e-9)
    assert float(variation_ratio(logp)[0]) == pytest.approx(0.5)
    assert torch.allclose(mixture_logp(logp).exp(), torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert float(entropy(torch.log(torch.tensor([0.5, 0.5])))) == pytest.approx(math.log(2), abs=1e-6)


def test_auroc_by_hand():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert auroc(torch.tensor([0.8, 0.5, 0.4, 0.1]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.75)
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])) == 1.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5  # a tie counts half
    assert math.isnan(auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))


def test_ece_by_hand():
    """Bins of width 0.5: [0.2 wrong, 0.4 right] -> conf 0.3, acc 0.5; [0.9 right, 0.7 wrong] -> conf 0.8,
    acc 0.5; ECE = 0.5 * 0.2 + 0.5 * 0.3 = 0.25."""
    conf = torch.tensor([0.2, 0.4, 0.9, 0.7])
    ok = torch.tensor([False, True, True, False])
    assert ece(conf, ok, bins=2) == pytest.approx(0.25)
    rows = reliability(conf, ok, bins=2)
    assert [r["count"] for r in rows] == [2, 2]
    assert ece(torch.ones(3), torch.ones(3, dtype=torch.bool)) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_run_dir(tmp_path_factory.mktemp("run"))
    gated = gate(tiny_model("llama", seed=0), group_size=16)
    result = KeepsetSolver(Posterior.from_dir(path), num_draws=16, seed=0).solve(size=0.5)
    blocks = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    return gated, result, blocks


def test_predictive_on_tiny_model(setup):
    gated, result, blocks = setup
    rep = predictive_uncertainty(gated, result, blocks, k=4)
    assert rep.tokens == 2 * 11 and rep.k == 4
    assert rep.mi_mean >= 0 and 0 <= rep.variation_ratio_mean <= 1
    assert 0 <= rep.ece_averaged <= 1 and 0 <= rep.ece_single <= 1
    assert rep.auroc_mi != rep.auroc_mi or 0 <= rep.auroc_mi <= 1  # nan when the model makes no error
    assert sum(r["count"] for r in rep.reliability_averaged) == rep.tokens


def test_predictive_identical_subnetworks_give_zero_mi(setup):
    """If every sampled keep-set is the reported one, the K members agree exactly: MI = 0."""
    gated, result, blocks = setup
    same = result.draw_keep.clone()
    same[:] = result.table.flatten(result.table.inventory.masks(result.keep)) > 0.5
    from dataclasses import replace

    rep = predictive_uncertainty(gated, replace(result, draw_keep=same), blocks, k=4)
    assert rep.mi_mean == pytest.approx(0.0, abs=1e-9)
    assert rep.variation_ratio_mean == 0.0
    assert rep.nll_averaged == pytest.approx(rep.nll_single, abs=1e-9)


def test_total_entropy_auroc_on_constructed_predictions(setup, monkeypatch):
    """Known answers through ``predictive_uncertainty`` with the members' predictions constructed (a
    random tiny model errs on every token, leaving the AUROCs undefined). The single network is right
    on even positions. (a) Identical members, the single network unsure where it errs: the average is
    the single network, so its entropy flags the same errors exactly as well (MI is 0 up to rounding,
    so its AUROC is not asserted). (b) The single network confidently wrong on odd positions, the
    members each putting that mass on another wrong token: only the members' disagreement shows the
    errors, so the averaged entropy flags them perfectly while the single entropy cannot (near 0.5);
    an averaged entropy read off the single network would fail (b)."""
    import ppn_bayes.analysis.uncertainty as unc

    gated, result, blocks = setup
    T, V = blocks.shape[1] - 1, 5
    gen = torch.Generator().manual_seed(0)

    def logits_for(block, identical):
        target = block[1:]
        right = torch.arange(T) % 2 == 0
        base = torch.randn(T, V, generator=gen)
        base[right, target[right]] += 4.0
        members = base.expand(4, T, V).clone()
        if not identical:
            wrong = (target[~right] + 1) % V
            base[~right, wrong] += 4.0  # confidently wrong
            for k in range(4):
                members[k, ~right, (wrong + k) % V] += 4.0
        return base.log_softmax(-1), members.log_softmax(-1)

    for identical in (True, False):
        made = {}

        def fake(gated_, post, keepsets, lam, block, identical=identical, made=made):
            key = tuple(block.tolist())
            if key not in made:
                made[key] = logits_for(block, identical)
            single, members = made[key]
            return single.unsqueeze(0) if len(keepsets) == 1 else members[:len(keepsets)]

        monkeypatch.setattr(unc, "subnetwork_logprobs", fake)
        rep = unc.predictive_uncertainty(gated, result, blocks % V, k=4)
        if identical:
            assert rep.auroc_total_entropy == pytest.approx(rep.auroc_single_entropy, abs=1e-12)
            assert rep.mi_mean < 1e-6 and rep.auroc_single_entropy > 0.8  # 0.895 here: not a tie
        else:
            assert rep.error_rate_single == pytest.approx(10 / 22)  # exactly the odd positions (2 blocks x 5)
            assert rep.auroc_total_entropy == pytest.approx(1.0) and rep.auroc_single_entropy < 0.75


def test_evaluate_keepset_band(setup):
    gated, result, blocks = setup
    ev = evaluate_keepset(gated, result, blocks, samples=3)
    assert ev["samples"] == 3 and ev["nll_q05"] <= ev["nll_q50"] <= ev["nll_q95"]
    assert ev["ppl"] == pytest.approx(math.exp(ev["nll"]))


@pytest.fixture(scope="module")
def fitted(tiny_llama_dir, tmp_path_factory):
    from ppn_bayes.config import recipe_from_dict
    from ppn_bayes.data.corpus import load_corpus
    from ppn_bayes.run import fit

    corpus = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    corpus.write_text(load_corpus("bundled", "validation")[0][:12_000], encoding="utf-8")
    r = recipe_from_dict({"name": "tiny", "model": {"name": str(tiny_llama_dir)}, "units": {"group_size": 16},
                          "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2},
                          "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "eval_lambdas": [0.5]}})
    return fit(r, out=tmp_path_factory.mktemp("runs") / "r", progress=False)


def test_cli_uncertainty_and_keepset_eval(fitted, capsys):
    import json

    from ppn_bayes.cli import main

    assert main(["uncertainty", str(fitted.path), "--size", "0.6", "--k", "3", "--blocks", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["k"] == 3 and rep["tokens"] == 31 and rep["mi_mean"] >= 0
    assert main(["keepset", str(fitted.path), "--size", "0.6", "--draws", "16", "--eval", "--blocks", "1",
                 "--samples", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["eval"]["samples"] == 2 and d["eval"]["nll_q05"] <= d["eval"]["nll_q95"]
    assert main(["uncertainty", str(fitted.path), "--size", "0.6", "--k", "1"]) == 2
