"""The Pyro model's factors against hand computations on a tiny Llama (issue 3, "Model")."""

from __future__ import annotations

import pyro
import pytest
import torch

from ppn_bayes.backbone.gated import gate
from ppn_bayes.bayes.model import PPNModel, sequence_nll
from ppn_bayes.config import PriorConfig, PushConfig
from tests.tiny_models import VOCAB, tiny_model

B, T, N_SEQ = 3, 12, 50


@pytest.fixture(scope="module")
def setup():
    hf = tiny_model("llama", seed=0)
    for p in hf.parameters():
        p.requires_grad_(False)
    g = gate(hf, group_size=16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -4:] = 0  # one padded sequence: pads must not count
    return hf, g, ids, mask


def _model(g, tempering=1.0, **push) -> PPNModel:
    m = PPNModel(g, PriorConfig(), PushConfig(**push), num_sequences=N_SEQ, tokens_per_sequence=T,
                 tempering=tempering)
    torch.manual_seed(3)
    with torch.no_grad():  # trained-looking amplitude scales: a dense step must still ignore them
        for p in (m.push.s_heads, m.push.s_groups, m.push.s_attn, m.push.s_mlp):
            p.normal_(0, 0.5)
    return m


def _summed_nll(hf, ids, mask) -> torch.Tensor:
    """Reference: the library-independent summed next-token NLL of the plain transformers model."""
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, labels=labels)
    return out.loss * (mask[:, 1:].sum())  # HF's loss is the mean over predicted (non-pad) tokens


def _trace(model, *args, **kwargs):
    pyro.set_rng_seed(0)
    with torch.no_grad():
        tr = pyro.poutine.trace(model).get_trace(*args, **kwargs)
    tr.compute_log_prob()
    return tr


def test_tokens_factor_is_scaled_summed_nll(setup):
    """log p(tokens | m) in the trace = -beta * sum NLL * N_seq / B on a dense step."""
    hf, g, ids, mask = setup
    beta = 0.7
    model = _model(g, tempering=beta)
    tr = _trace(model, ids, attention_mask=mask, lam=0.0)
    ref = _summed_nll(hf, ids, mask)
    site = tr.nodes["tokens"]
    assert site["scale"] == pytest.approx(N_SEQ / B)
    torch.testing.assert_close(site["log_prob_sum"], -beta * ref * N_SEQ / B, rtol=1e-5, atol=1e-4)
    assert float(model.last.token_loss) == pytest.approx(float(ref / mask[:, 1:].sum()), rel=1e-5)
    assert "compute" not in tr.nodes  # no compute price on dense steps


def test_subsample_indices_scale_like_the_batch(setup):
    _, g, ids, mask = setup
    model = _model(g)
    tr = _trace(model, ids, attention_mask=mask, lam=0.0, subsample=torch.tensor([4, 17, 30]))
    assert tr.nodes["tokens"]["scale"] == pytest.approx(N_SEQ / B)


def test_compute_factor_is_minus_n_beta_lambda_rho_bar(setup):
    _, g, ids, mask = setup
    beta, lam = 0.5, 0.8
    model = _model(g, tempering=beta, mask="expected")
    tr = _trace(model, ids, attention_mask=mask, lam=lam)
    scores = {k: tr.nodes[f"score_{k}"]["value"] for k in model.inventory.kinds}
    with torch.no_grad():
        rho_bar = model.push.expected_size(model.push.inclusion(scores, lam))
    n_tokens = N_SEQ * (T - 1)
    torch.testing.assert_close(tr.nodes["compute"]["log_prob_sum"], -n_tokens * beta * lam * rho_bar)
    assert 0.0 < float(rho_bar) < 1.0
    assert float(model.last.expected_size) == pytest.approx(float(rho_bar), rel=1e-6)


def test_dense_step_logits_equal_base_model(setup):
    """lambda = 0: every unit on, no amplitude change: bit-for-bit the base model's logits."""
    hf, g, ids, mask = setup
    model = _model(g)
    with torch.no_grad():
        base = hf(input_ids=ids, attention_mask=mask).logits
        with g.gates(**model.push.gates(None, 0.0)):
            gated = g(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(gated, base)


def test_masked_step_uses_the_masks(setup):
    """lambda > 0 with expected masks: the tokens factor equals the NLL with gates set by hand to the
    own inclusion probabilities times the amplitudes (so a push that ignored its masks would fail)."""
    hf, g, ids, mask = setup
    lam = 1.3
    model = _model(g, mask="expected")
    tr = _trace(model, ids, attention_mask=mask, lam=lam)
    scores = {k: tr.nodes[f"score_{k}"]["value"] for k in model.inventory.kinds}
    with torch.no_grad():
        own = model.push.unnest(model.push.inclusion(scores, lam))
        amp = model.push.amplitudes(lam)
        gates = {"layers": own["layers"], "heads": own["heads"] * amp["heads"],
                 "groups": own["groups"] * amp["groups"], "attn_scale": amp["attn_scale"],
                 "mlp_scale": amp["mlp_scale"]}
        with g.gates(**gates):
            logits = g(input_ids=ids, attention_mask=mask).logits
        nll, _ = sequence_nll(logits, ids, mask)
    torch.testing.assert_close(tr.nodes["tokens"]["log_prob_sum"], -nll.sum() * N_SEQ / B, rtol=1e-5, atol=1e-4)
    assert float(nll.sum()) != pytest.approx(float(_summed_nll(hf, ids, mask)), rel=1e-3)
