"""In-place distillation and the sandwich rule (issue 13): the forward KL is the reference KL, the
teacher gets no gradient, distillation off (or a dense step) changes nothing bit for bit, the sandwich
draws the prices it says into one optimizer step, and resume replays an uninterrupted run.

Tolerances: the KL against ``torch.distributions`` reorders float32 sums over a 96-token vocabulary
(rtol 1e-5); "unchanged" and "replays" are bitwise (``torch.equal``), as for the other resume tests.
"""

from __future__ import annotations

import json

import pytest
import torch
from pyro import poutine
from safetensors.torch import load_file

from ppn_bayes.bayes.model import PPNModel, sequence_kl, sequence_nll
from ppn_bayes.config import recipe_from_dict
from ppn_bayes.errors import ConfigError
from ppn_bayes.run import fit
from ppn_bayes.training.build import build
from ppn_bayes.training.loop import train_step
from ppn_bayes.training.sandwich import sandwich_prices
from ppn_bayes.training.schedule import step_seed


def tiny_recipe(model_dir, corpus, **train):
    t = {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "lr_guide": 0.05, "lr_push": 0.05,
         "lr_weights": 0.01, "schedule": "constant", "eval_lambdas": [0.5], **train}
    return recipe_from_dict({"name": "tiny", "model": {"name": str(model_dir)}, "units": {"group_size": 16},
                             "push": {"init": "size_curve"},
                             "data": {"corpus": str(corpus), "block_size": 32, "val_blocks": 2}, "train": t})


def assert_resume_replays(r, tmp_path) -> None:
    """Fit the 3-step recipe ``r`` whole, then cut after step 2's checkpoint and resume: the run's
    guide, push and adapter files, its prices and its token losses must equal the whole run's."""
    from ppn_bayes.training import checkpoint_files

    whole = fit(r, out=tmp_path / "whole", progress=False)

    def stop(s, step):  # after the checkpoint of step 2
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(r, out=tmp_path / "cut", progress=False, callbacks=[stop])
    assert checkpoint_files.load_checkpoint(checkpoint_files.find_checkpoint(tmp_path / "cut"))["trainer"]["step"] == 2
    resumed = fit(None, out=tmp_path / "cut", resume=True, progress=False)  # step 3 only, from the checkpoint
    for name in ("guide.safetensors", "push.safetensors", "adapter.safetensors"):
        a, b = load_file(str(whole.path / name)), load_file(str(resumed.path / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    wa, wb = whole.train_metrics(), resumed.train_metrics()
    assert [x["prices"] for x in wa] == [x["prices"] for x in wb]
    assert [x["token_loss"] for x in wa] == [x["token_loss"] for x in wb]


# ------------------------------------------------------------------------------------------ the KL


def test_forward_kl_equals_the_reference_and_a_reversed_kl_would_fail():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 9, 96, generator=g) * 2, torch.randn(3, 9, 96, generator=g) * 2
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # a padded sequence: its last predicted tokens do not count
    got = sequence_kl(student, teacher, mask)
    Cat = torch.distributions.Categorical
    ref = torch.distributions.kl_divergence(Cat(logits=teacher[:, :-1]), Cat(logits=student[:, :-1]))
    ref = (ref * mask[:, 1:]).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    reverse = torch.distributions.kl_divergence(Cat(logits=student[:, :-1]), Cat(logits=teacher[:, :-1]))
    reverse = (reverse * mask[:, 1:]).sum(-1)
    assert not torch.allclose(got, reverse, rtol=1e-2)  # the power check: the other direction is far off
    assert torch.equal(sequence_kl(teacher, teacher, mask), torch.zeros(3))


# ------------------------------------------------------------------------------------ the model


@pytest.fixture()
def gated():
    from tiny_models import tiny_model

    from ppn_bayes.backbone.gated import gate

    return gate(tiny_model("llama"), group_size=16, kinds=("layers", "heads", "groups"))


def _ppn(gated, w, teacher=None):
    from ppn_bayes.config import PriorConfig, PushConfig

    return PPNModel(gated, PriorConfig(), PushConfig(), num_sequences=8, tokens_per_sequence=12,
                    distill_weight=w, teacher=teacher)


def _tokens(model, ids, lam, seed=0, **kw):
    torch.manual_seed(seed)
    model.set_generator(torch.Generator().manual_seed(seed))
    tr = poutine.trace(model).get_trace(ids, lam=lam, **kw)
    return tr.nodes["tokens"]["fn"].log_factor if hasattr(tr.nodes["tokens"]["fn"], "log_factor") else \
        tr.nodes["tokens"]["fn"].log_prob(tr.nodes["tokens"]["value"])


def _never(*_a, **_k):
    raise AssertionError("the teacher was called")


def test_distillation_off_and_dense_steps_are_unchanged_bit_for_bit(gated):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    off = _ppn(gated, 0.0, teacher=_never)  # w = 0: the teacher is never asked for
    pruned = _tokens(off, ids, 0.7)
    with torch.no_grad():  # the old path: the tokens factor is -beta * the summed NLL of the same masks
        torch.manual_seed(0)
        off.set_generator(torch.Generator().manual_seed(0))
        scores = off.prior()
        rho = off.push.inclusion(scores, 0.7)
        masks = off.push.sample_masks(rho, off._generator)
        with gated.gates(**off.push.gates(masks, 0.7)):
            nll, _ = sequence_nll(gated(input_ids=ids).logits, ids, None)
    assert torch.equal(pruned.detach(), -nll)
    on = _ppn(gated, 1.0, teacher=_never)  # a dense step needs no teacher: it is the teacher pass
    assert torch.equal(_tokens(on, ids, 0.0).detach(), _tokens(off, ids, 0.0).detach())


def test_the_teacher_gets_no_gradient(gated):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    from tiny_models import tiny_model

    other = tiny_model("llama", seed=3)  # a teacher with trainable parameters of its own
    other.requires_grad_(True)
    seen = []

    def teacher(input_ids, attention_mask=None):
        out = other(input_ids=input_ids).logits
        seen.append(out.requires_grad)
        return out

    ppn = _ppn(gated, 0.5, teacher=teacher)
    torch.manual_seed(0)
    ppn.set_generator(torch.Generator().manual_seed(0))
    loss = poutine.trace(ppn).get_trace(ids, lam=0.8).nodes["_RETURN"]["value"]
    loss.backward()
    assert seen == [False] and all(p.grad is None for p in other.parameters())
    assert ppn.last.distill_kl is not None and float(ppn.last.distill_kl) > 0
    assert any(p.grad is not None for p in ppn.push.parameters())  # the student did learn
    self_teacher = _ppn(gated, 1.0).teacher_logits(ids)  # teacher: self, the dense gated network
    assert not self_teacher.requires_grad and self_teacher.grad_fn is None


def test_lora_base_teacher_is_the_base_model_without_gradient(tiny_llama_dir, corpus, tmp_path):
    s = build(tiny_recipe(tiny_llama_dir, corpus, weights="lora", distill_weight=1.0, teacher="base"), tmp_path / "r")
    ids = s.train_blocks[:2]
    with torch.no_grad():
        for pair in s.lora.pairs.values():
            pair.B.normal_()  # adapters that change the output
        base = s.ppn.teacher_logits(ids)
        with s.lora.disabled():
            want = s.gated(input_ids=ids).logits
        adapted = s.gated(input_ids=ids).logits  # the hooks are back on exit
    assert torch.equal(base, want) and not torch.allclose(base, adapted) and not base.requires_grad


def test_full_weights_base_teacher_is_refused_under_fsdp(tiny_llama_dir, corpus):
    from ppn_bayes.training.build import _teacher

    r = tiny_recipe(tiny_llama_dir, corpus, weights="full", distill_weight=1.0, teacher="base", distributed="fsdp")
    with pytest.raises(ConfigError, match="train.teacher=self") as err:
        _teacher(r, None, None, tiny_llama_dir, torch.device("cpu"), world=2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key,value", [("distill_weight", 1.5), ("distill_weight", -0.1),
                                       ("sandwich_min_size", 1.0), ("sandwich_random", -1), ("teacher", "big")])
def test_bad_distillation_keys_are_one_line_errors(tiny_llama_dir, corpus, key, value):
    with pytest.raises(ConfigError, match=f"train.{key}") as err:
        tiny_recipe(tiny_llama_dir, corpus, **{key: value})
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------- the sandwich


def _kept_fraction(s, price: float) -> float:
    """The decoder-params fraction the session's current push keeps in expectation at ``price``, at the
    guide's median scores (what the sandwich solves its prices for)."""
    from ppn_bayes.bayes.lambda_star import expected_cost
    from ppn_bayes.training.heldout import median_scores

    scores = {k: v.unsqueeze(0) for k, v in median_scores(s.ppn, s.guide).items()}

    class View:
        inventory = s.ppn.inventory

        @staticmethod
        def inclusion(sc, lam):
            with torch.no_grad():
                return s.ppn.push.inclusion(sc, lam)

    return float(expected_cost(View, None, scores, price, "params")[0]) / s.ppn.inventory.total_cost("params")


def test_sandwich_draws_dense_smallest_and_random_prices_into_one_optimizer_step(tiny_llama_dir, corpus, tmp_path):
    r = tiny_recipe(tiny_llama_dir, corpus, weights="lora", sandwich=True, sandwich_min_size=0.5,
                    sandwich_random=2, distill_weight=1.0)
    s = build(r, tmp_path / "r")
    prices = sandwich_prices(s, 0)
    assert len(prices) == 4 and prices[0] == 0.0 and all(p > 0 for p in prices[1:])
    g = torch.Generator().manual_seed(step_seed(0, 0, stream=2))
    rand = [float(torch.empty((), dtype=torch.float64).exponential_(1.0, generator=g)) / 0.3 for _ in range(2)]
    assert prices[2:] == rand
    # the smallest size's price: the current push keeps 0.5 of the decoder's parameters at the median
    assert _kept_fraction(s, prices[1]) == pytest.approx(0.5, abs=1e-3)
    assert _kept_fraction(s, prices[1] * 0.8) > 0.5 + 1e-3  # power check: a wrong price misses the size
    calls, steps, teachers = [], [], []
    forward = s.ppn.forward

    def counted(*a, **k):
        calls.append(k.get("lam"))
        teachers.append(k.get("teacher_logits") is not None)
        return forward(*a, **k)

    s.ppn.forward = counted
    step = s.optimizer.step
    s.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    record = train_step(s, 0)
    assert calls == prices and len(steps) == 1  # four passes, one optimizer step
    assert teachers == [False, True, True, True]  # the pruned passes got the dense pass's logits
    assert record["prices"] == prices and [p["lambda"] for p in record["sandwich"]] == prices
    assert record["lambda"] == prices[1] and "distill_kl" in record and "distill_kl" not in record["sandwich"][0]
    from ppn_bayes.training.rundir import METRICS_SCHEMA

    METRICS_SCHEMA.check(json.loads(json.dumps(record)), "")


def test_sandwich_sizes_add_a_pass_at_each_target_size(tiny_llama_dir, corpus, tmp_path):
    """``sandwich_sizes`` adds one price per target size after the smallest's, largest first, each the
    price at which the current push keeps that fraction; the random prices stay the same draws."""
    from ppn_bayes.compare.rows import run_passes

    r = tiny_recipe(tiny_llama_dir, corpus, weights="lora", sandwich=True, sandwich_min_size=0.4,
                    sandwich_sizes=[0.6, 0.8], sandwich_random=1, distill_weight=1.0)
    s = build(r, tmp_path / "r")
    prices = sandwich_prices(s, 0)
    plain = sandwich_prices(build(tiny_recipe(tiny_llama_dir, corpus, weights="lora", sandwich=True,
                                              sandwich_min_size=0.4, sandwich_random=1, distill_weight=1.0),
                                  tmp_path / "plain"), 0)
    assert len(prices) == 5 == run_passes(r) and prices[:2] == plain[:2] and prices[-1] == plain[-1]
    fracs = [_kept_fraction(s, p) for p in prices[1:4]]
    assert fracs == pytest.approx([0.4, 0.8, 0.6], abs=1e-3)  # smallest, then the targets largest first
    record = train_step(s, 0)
    assert record["prices"] == prices and len(record["sandwich"]) == 5
    with pytest.raises(ConfigError, match="train.sandwich_sizes"):
        tiny_recipe(tiny_llama_dir, corpus, sandwich=True, sandwich_min_size=0.4, sandwich_sizes=[0.3])
    with pytest.raises(ConfigError, match="train.sandwich_sizes: applies to the sandwich rule"):
        tiny_recipe(tiny_llama_dir, corpus, sandwich_sizes=[0.6])


@pytest.mark.slow
def test_sandwich_with_distillation_resumes_like_an_uninterrupted_run(tiny_llama_dir, corpus, tmp_path):
    r = tiny_recipe(tiny_llama_dir, corpus, weights="lora", sandwich=True, sandwich_random=1,
                    distill_weight=0.5, steps=3)
    assert_resume_replays(r, tmp_path)


# ----------------------------------------------------------------- peers' healing and ppn-healed


def _kl_to(model, teacher, blocks):
    with torch.no_grad():
        s, t = model(input_ids=blocks).logits, teacher(input_ids=blocks).logits
    return float(sequence_kl(s, t, None).sum() / (blocks.shape[0] * (blocks.shape[1] - 1)))


def test_heal_with_distillation_lowers_the_kl_to_the_dense_model_and_the_teacher_stays_put():
    from tiny_models import VOCAB, tiny_model

    from ppn_bayes.backbone.materialize import materialize
    from ppn_bayes.baselines.shortgpt import shortgpt
    from ppn_bayes.compare.healing import heal

    dense = tiny_model("llama", intermediate_size=128)
    g = torch.Generator().manual_seed(0)
    calib, train = torch.randint(0, VOCAB, (4, 24), generator=g), torch.randint(0, VOCAB, (16, 24), generator=g)
    res = shortgpt(dense, calib, [0.5])
    small = materialize(dense, res.keepsets[0.5], res.inventory)
    before_teacher = {k: v.clone() for k, v in dense.state_dict().items()}
    before = _kl_to(small, dense, train)
    torch.manual_seed(0)
    healed = heal(small, train, lr=3e-3, batch_size=4, loss="distill", teacher=dense)
    after = _kl_to(healed, dense, train)
    assert after < 0.8 * before, (before, after)  # a clear drop (measured 0.0037 -> 0.0021)
    small = materialize(dense, res.keepsets[0.5], res.inventory)
    torch.manual_seed(0)
    data = _kl_to(heal(small, train, lr=3e-3, batch_size=4, loss="data"), dense, train)
    assert data > after  # the power check: healing on the data loss does not do what distillation does (0.0053)
    assert all(torch.equal(v, before_teacher[k]) for k, v in dense.state_dict().items())
    assert all(p.grad is None for p in dense.parameters())
    with pytest.raises(ConfigError, match="choose from data,distill"):
        heal(small, train, loss="kl", teacher=dense)


def test_ppn_healed_rows_heal_each_size_from_the_same_run(tiny_run, tiny_llama_dir, tiny_tokenizer):
    from ppn_bayes.compare.comparison import compare
    from ppn_bayes.hub.zoo import load_model

    model, _ = load_model(tiny_llama_dir)
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, len(tiny_tokenizer), (3, 16), generator=g)
    heal_blocks = torch.randint(0, len(tiny_tokenizer), (4, 16), generator=g)
    out = compare(model, b, b, [0.8, 0.5], ["ppn", "ppn-healed", "shortgpt"], run_dir=str(tiny_run),
                  decode_tokens=0, heal_blocks=heal_blocks, heal_loss="distill", model_path=tiny_llama_dir)
    rows = {(r["method"], r["size"]): r for r in out["results"]}
    for size in (0.8, 0.5):
        plain, healed = rows[("ppn", size)], rows[("ppn-healed", size)]
        assert plain["healed_tokens"] == 0 and healed["healed_tokens"] == 64 and healed["heal_loss"] == "distill"
        assert healed["param_fraction"] == plain["param_fraction"] and healed["perplexity"] != plain["perplexity"]
        assert rows[("shortgpt", size)]["heal_loss"] == "distill"
    train = rows[("ppn", 0.8)]["train_tokens"]
    assert out["tokens"]["ppn"] == train and out["tokens"]["ppn-healed"] == train + 2 * 64
    assert out["tokens"]["shortgpt"] == 2 * 64 and out["config"]["heal_loss"] == "distill"
    with pytest.raises(ConfigError, match="--heal-tokens"):
        compare(model, b, b, [0.5], ["ppn-healed"], run_dir=str(tiny_run), decode_tokens=0)
    # the healing rate is one for every healed row, recorded on each; another rate heals otherwise
    assert out["config"]["heal_lr"] == 5e-5 and rows[("shortgpt", 0.5)]["heal_lr"] == 5e-5
    fast = compare(model, b, b, [0.5], ["shortgpt"], decode_tokens=0, heal_blocks=heal_blocks, heal_loss="distill",
                   heal_lr=3e-3)["results"][0]
    assert fast["heal_lr"] == 3e-3 and fast["perplexity"] != rows[("shortgpt", 0.5)]["perplexity"]


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "shortgpt,ppn-heald"], "unknown method"),
    (["--heal-tokens", "64", "--heal-loss", "kl"], "unknown heal loss"),
    (["--heal-loss", "distill"], "--heal-tokens"),
    (["--methods", "ppn-healed"], "--heal-tokens"),
    (["--heal-lr", "1e-4"], "--heal-lr applies to healing"),
    (["--heal-tokens", "64", "--heal-lr", "0"], "--heal-lr must be a finite number > 0"),
    (["--heal-tokens", "64", "--heal-lr", "nan"], "--heal-lr must be a finite number > 0"),
])
def test_cli_refuses_unknown_methods_and_heal_losses_in_one_line(argv, needle, tiny_llama_dir, tmp_path, capsys):
    from ppn_bayes.cli import main

    code = main(["compare", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------ the fair fight


def _fair_fight():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fair_fight.py"
    spec = importlib.util.spec_from_file_location("fair_fight", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fair_fight_stages_and_table_state_tokens_and_wall_time(tmp_path):
    from pathlib import Path

    ff = _fair_fight()
    run = Path("runs/x")
    assert ff.stage_args("healed-distill", run, 1000)[:8] == [
        "--methods", "shortgpt,gisp,ppn-healed", "--run", "runs/x", "--heal-tokens", "1000", "--heal-loss", "distill"]
    assert "data" in ff.stage_args("healed-data", run, 1000)
    assert ff.stage_args("healed-data", run, 1000, "shortgpt", 2e-4)[:2] == ["--methods", "shortgpt"]
    assert "--heal-lr" not in ff.stage_args("healed-data", run, 1000) and "0.0002" in ff.stage_args(
        "healed-data", run, 1000, heal_lr=2e-4)
    assert ff.label("healed-data", {"method": "shortgpt", "healed_tokens": 1, "heal_lr": 2e-4}) == \
        "shortgpt, healed per size (data, lr 0.0002)"
    assert ff.label("ppn", {"method": "ppn", "weights": "full", "sandwich": True, "distill_weight": 1.0}) == \
        "ppn, one run (full, sandwich, distill w=1, 1 passes/step)"
    with pytest.raises(SystemExit, match="unknown stage"):
        ff.stage_args("peers", run, 1)
    dense = {"method": "dense", "size": 1.0, "perplexity": 50.0}
    ppn = {"method": "ppn", "size": 0.5, "perplexity": 100.0, "sandwich": True, "distill_weight": 1.0,
           "passes_per_step": 3, "healed_tokens": 0}
    stages = {"ppn": {"dense": dense, "results": [ppn], "costs": {"ppn": 600.0}, "tokens": {"ppn": 10240}},
              "healed-distill": {"dense": dense, "costs": {"shortgpt": 90.0}, "tokens": {"shortgpt": 3 * 10240},
                                 "results": [{"method": "shortgpt", "size": 0.5, "perplexity": 120.0,
                                              "healed_tokens": 10240, "heal_loss": "distill"}]}}
    for name, data in stages.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    result = ff.merge(tmp_path)
    md = ff.table(result)
    assert "ppn, one run (sandwich, distill w=1, 3 passes/step) | 100.0 (2.00) | 10,240 | 600 |" in md
    assert "shortgpt, healed per size (distill) | 120.0 (2.40) | 30,720 | 90 |" in md
    # the transfer domain's table reads the transfer perplexities, against dense's on the same blocks
    for data, value in ((stages["ppn"], 300.0), (stages["healed-distill"], 150.0)):
        data["dense"] = {**dense, "transfer_perplexity": 75.0}
        data["results"][0]["transfer_perplexity"] = value
        (tmp_path / f"{'ppn' if data is stages['ppn'] else 'healed-distill'}.json").write_text(json.dumps(data))
    moved = ff.table(ff.merge(tmp_path), "transfer_perplexity")
    assert "dense perplexity 75.00" in moved and "| 300.0 (4.00) |" in moved and "| 150.0 (2.00) |" in moved


def test_full_weights_base_teacher_is_a_frozen_copy_of_the_base(tiny_llama_dir, corpus, tmp_path):
    s = build(tiny_recipe(tiny_llama_dir, corpus, weights="full", distill_weight=1.0, teacher="base"), tmp_path / "r")
    ids = s.train_blocks[:2]
    with torch.no_grad():
        before = s.ppn.teacher_logits(ids)
        for p in s.named_weights.values():
            p.add_(0.05)  # training moves the decoder; the teacher must not move with it
        after = s.ppn.teacher_logits(ids)
        moved = s.gated(input_ids=ids).logits
    assert torch.equal(before, after) and not torch.allclose(before, moved) and not after.requires_grad
