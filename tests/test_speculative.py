"""Self-speculative decoding: greedy output is the verifier's, sampled output has its distribution."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from ppn_bayes.backbone import KeepSet
from ppn_bayes.errors import ConfigError
from ppn_bayes.evaluation.speculative import (
    autoregressive_generate,
    benchmark_speculative,
    shared_draft_model,
    speculative_generate,
    verify_draft,
)
from ppn_bayes.export.switch import SubnetSwitch


def peaked(family: str, scale: float = 30.0, **kw):
    """A tiny random model with a scaled-up LM head, so next-token distributions are far from uniform
    and the dropped-layer draft really disagrees with the verifier (near-uniform logits would make
    every test trivially pass)."""
    model = tiny_model(family, **kw)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def layer_keep(sw: SubnetSwitch, layers: list[int]) -> KeepSet:
    inv = sw.inventory
    full = inv.full_keepset()
    return inv.complete(KeepSet(layers=layers, heads=full.heads, groups=full.groups))


def prompt(seed: int = 3, n: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculative_output_is_the_verifiers_token_for_token(family, k):
    model = peaked(family)
    sw = SubnetSwitch(model)
    expected, _ = autoregressive_generate(model, prompt(), 40)
    for draft in ([0], [0, 2], [1, 2]):
        got, stats = speculative_generate(sw, layer_keep(sw, draft), prompt(), 40, k)
        assert torch.equal(got, expected), (draft, k)
        assert stats.new_tokens == 40 and stats.accepted <= stats.drafted
        assert stats.rounds == pytest.approx(40 - stats.accepted, abs=0)  # each round: accepted + 1 token
    # a head/group draft (masked through the gates) is exact too
    head_draft = KeepSet(layers=[0, 1], heads=[(0, 0), (0, 5), (1, 2)], groups=[(0, 0), (1, 3), (1, 20)])
    got, _ = speculative_generate(sw, head_draft, prompt(), 40, k)
    assert torch.equal(got, expected)
    assert len(sw.gated.family.layers(model)) == 3 and sw.gated.current_gates()["heads"] is None


def test_stops_at_eos_like_the_verifier():
    model = peaked("llama")
    sw = SubnetSwitch(model)
    full, _ = autoregressive_generate(model, prompt(), 30)
    eos = int(full[0, prompt().shape[1] + 9])  # the 10th generated token
    expected, _ = autoregressive_generate(model, prompt(), 30, eos_token_id=eos)
    got, _ = speculative_generate(sw, layer_keep(sw, [0]), prompt(), 30, 4, eos_token_id=eos)
    assert torch.equal(got, expected) and int(got[0, -1]) == eos


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_rejection_rule_preserves_the_verifier_distribution_exactly():
    """Context-free p, q: every emitted token must be ~ p whatever q is (Monte Carlo, V = 5, k = 3)."""
    g = torch.Generator().manual_seed(0)
    V, k, n = 5, 3, 20000
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5])  # adversarial draft
    first, second = torch.zeros(V), torch.zeros(V)
    first_accepted = 0
    for _ in range(n):
        drafts = torch.multinomial(q, k, replacement=True, generator=g)
        n_acc, nxt = verify_draft(p.expand(k + 1, V), q.expand(k, V), drafts, greedy=False, generator=g)
        emitted = drafts[:n_acc].tolist() + [nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
        first_accepted += n_acc >= 1
    # TV of n = 20000 multinomial draws over 5 cells has sd ~ 0.003; 0.015 is > 4 sd.
    assert _tv(first, p) < 0.015
    assert _tv(second, p) < 0.02  # fewer draws (only after an acceptance)
    # a draft is accepted with probability sum_x min(p, q) = 0.45 (Leviathan et al. 2023, Thm 3.5);
    # the binomial sd at n = 20000 is 0.0035, so 0.015 is > 4 sd
    assert first_accepted / n == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.015)


def test_sampled_speculative_output_matches_the_verifier_distribution_end_to_end():
    """Joint law of two sampled tokens vs the verifier's exact p(t1) p(t2 | t1) on an 8-token vocabulary."""
    V = 8
    model = peaked("llama", scale=8.0, vocab_size=V)
    sw = SubnetSwitch(model)
    draft = layer_keep(sw, [1])
    x = torch.tensor([[1, 5, 2]])
    with torch.no_grad():
        p1 = torch.softmax(model(x).logits[0, -1], -1)
        both = torch.cat([x.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = torch.softmax(model(both).logits[:, -1], -1)
        with sw.use(draft) as d:
            q1 = torch.softmax(d(x).logits[0, -1], -1)
            q2 = torch.softmax(d(both).logits[:, -1], -1)
    joint_p = (p1[:, None] * p2).flatten()
    joint_q = (q1[:, None] * q2).flatten()
    assert 0.5 * float((joint_p - joint_q).abs().sum()) > 0.2  # the draft alone is far off: the test has power
    g = torch.Generator().manual_seed(1)
    n = 2500
    counts = torch.zeros(V * V)
    for _ in range(n):
        out, _ = speculative_generate(sw, draft, x, 2, 2, do_sample=True, generator=g)
        counts[int(out[0, -2]) * V + int(out[0, -1])] += 1
    # Expected TV of n draws over 64 cells is ~ 0.5 * sum sqrt(2 p / (pi n)) <= 0.065 at n = 2500
    # (Cauchy-Schwarz); 0.1 is above that and well below the draft's own TV of 0.25.
    assert _tv(counts, joint_p) < 0.1
    assert _tv(counts, joint_q) > 0.15


def test_shared_weights_draft_works_as_transformers_assistant_model():
    model = peaked("llama", num_hidden_layers=4)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    sw = SubnetSwitch(model)
    draft = shared_draft_model(sw, layer_keep(sw, [0, 3]))
    calls = {0: 0, 1: 0}
    for i in (0, 1):
        model.model.layers[i].register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    expected = model.generate(prompt(), max_new_tokens=30, do_sample=False)
    calls.update({0: 0, 1: 0})
    got = model.generate(prompt(), max_new_tokens=30, do_sample=False, assistant_model=draft)
    assert torch.equal(got, expected)
    assert calls[0] > calls[1]  # layer 1 ran only in verifier calls: the draft really was the sub-network
    assert draft.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight
    assert len(model.model.layers) == 4


def test_benchmark_reports_every_pair_and_picks_an_identical_best():
    model = peaked("llama")
    sw = SubnetSwitch(model)
    drafts = {0.34: layer_keep(sw, [0]), 0.67: layer_keep(sw, [0, 2])}
    res = benchmark_speculative(sw, prompt(), drafts, [2, 4], max_new_tokens=16)
    assert len(res.trials) == 4 and res.new_tokens == 16
    assert {(t["size"], t["draft_length"]) for t in res.trials} == {(0.34, 2), (0.34, 4), (0.67, 2), (0.67, 4)}
    assert all(t["identical"] and 0 <= t["acceptance_rate"] <= 1 for t in res.trials)
    assert res.best is max(res.trials, key=lambda t: t["speedup"])
    json.dumps(res.to_dict())


def test_bad_arguments_are_one_line_errors():
    sw = SubnetSwitch(tiny_model("llama"))
    keep = layer_keep(sw, [0])
    with pytest.raises(ConfigError, match="one non-empty prompt"):
        speculative_generate(sw, keep, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ConfigError, match="draft_length"):
        speculative_generate(sw, keep, prompt(), 4, 0)
    with pytest.raises(ConfigError, match="temperature"):
        speculative_generate(sw, keep, prompt(), 4, do_sample=True, temperature=0)


def test_cli_speculate_json(tiny_llama_dir, capsys):
    from ppn_bayes.cli import main

    rc = main(["speculate", "--model", str(tiny_llama_dir), "--prompt", "It is a truth", "--sizes", "0.5",
               "--draft-lengths", "2,3", "--max-new-tokens", "8", "--device", "cpu", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["trials"]) == 2 and out["best"]["identical"] and isinstance(out["text"], str)
    assert main(["speculate", "--model", str(tiny_llama_dir), "--prompt", "x", "--draft-lengths", "a"]) == 2


@pytest.mark.slow
def test_smollm2_greedy_speculative_equals_dense_greedy(smollm2_path):
    from ppn_bayes.evaluation.bench import layer_keepset_by_norm
    from ppn_bayes.hub.zoo import load_model

    model, tok = load_model(smollm2_path)
    keep, inv = layer_keepset_by_norm(model, 0.5)
    sw = SubnetSwitch(model, inv)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    expected, _ = autoregressive_generate(model, ids, 24)
    got, stats = speculative_generate(sw, keep, ids, 24, 4)
    sw.close()
    assert torch.equal(got, expected)
    assert stats.drafted > 0
