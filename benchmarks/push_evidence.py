"""Push evidence (issue 3): after a joint PPN run, the run's network at sizes 1.0 / 0.75 / 0.5 beats
the base model pruned to the same size by weight norm, and the dense loss stays near the base's.

    python benchmarks/push_evidence.py [--out DIR] [--pretrain-steps 400] [--steps 300] [--control] [--investigate]

Steps (all seeded, CPU, one thread is enough):

1. **Base model.** A 4-layer Llama (hidden 64, MLP 256, 4 query / 2 KV heads, 320-token byte-level
   BPE trained on the bundled Austen validation text, as ``tests/conftest.py::tiny_tokenizer``) is
   pretrained with plain next-token loss on the bundled corpus' train split (blocks of 64 tokens),
   AdamW, cosine schedule, and saved as a local checkpoint directory. Pruning it costs something.
2. **Joint run.** ``ppn_bayes.training.loop.fit`` on that checkpoint, weights ``full``, heads + MLP channel
   groups of 32 gated (:data:`RUN`, choices explained there), same corpus.
3. **Held-out loss** (NLL per token, the first :data:`EVAL_BLOCKS` blocks of the *test* split,
   *Persuasion*, unseen by both) at sizes 1.0, 0.75, 0.5 (fractions of decoder parameters):

   * (a) the run's network at that size: :func:`ppn_bayes.evaluation.targets.load_run_target` (the posterior
     keep-set, masks times amplitude corrections at lambda*);
   * (b) the base model before the run, pruned by weight norm (:func:`norm_keepsets`): the same unit
     kinds (heads and channel groups), each unit's Frobenius norm centred per kind on the log scale
     (``log r_u - mean log r`` over its kind: exactly the score the run starts from, with no offsets),
     units removed from the smallest up, one nested order, each keep-set the longest prefix whose
     exact cost (:meth:`UnitInventory.kept_cost`, GQA-aware) fits the budget
     (:func:`ppn_bayes.baselines.keepsets_from_order`).

``--control`` adds the base trained densely for the same number of extra steps (same LR and batch),
then pruned by norm: what the extra training alone buys. ``--investigate`` adds the price sweep of the investigation (see ``benchmarks/RESULTS.md``,
"Push evidence"): for fixed prices lambda, the size the trained push picks vs the size that minimizes
``NLL + lambda * size`` over the push's own family of sub-networks, for runs trained with
Exp(0.3), Exp(3) and a fixed lambda = 1, plus a check that the logged ELBO equals
``-(mean NLL + lambda * rho_bar) - KL / N`` (the per-token scaling of the two factors).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = (1.0, 0.75, 0.5)
BLOCK = 64
EVAL_BLOCKS = 32
BASE_CONFIG = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}

# The joint run. Why these values:
# * units heads + groups of 32 channels (8 per layer): a head costs 3,072 params, a group 6,144, so the
#   budgets 0.75/0.5 can be met closely; whole layers (25 % each here) are too coarse for 4 layers.
# * weights full, lr_weights 1e-3 (a third of the pretraining peak LR): the weights heal the pruned
#   sub-networks without forgetting the dense model.
# * push.rate 0.3 (the paper's), threshold_max 1.5 (the demo's gentler start: every unit begins at
#   rho >= ~0.5 for lambda <= 1), lr_push 0.05 / lr_guide 0.05, 300 steps of 16 x 64 tokens.
RUN = {
    "units": {"kinds": ["heads", "groups"], "group_size": 32},
    "push": {"rate": 0.3, "threshold_max": 1.5},
    "train": {"steps": 300, "batch_size": 16, "weights": "full", "lr_guide": 0.05, "lr_push": 0.05,
              "lr_weights": 1e-3, "schedule": "cosine", "warmup_steps": 10, "clip_grad": 1.0, "seed": 0,
              "device": "cpu", "log_every": 50, "checkpoint_every": 1000, "eval_lambdas": [0.25, 1.0],
              "eval_batch_size": 16},
}


def make_tokenizer():
    """The 320-token byte-level BPE of ``tests/conftest.py::tiny_tokenizer`` (same recipe, same text)."""
    from ppn_bayes.data.corpus import load_corpus, train_bpe_tokenizer

    return train_bpe_tokenizer(load_corpus("bundled", "validation")[0][:60_000], vocab_size=320)


def eval_blocks(tokenizer) -> torch.Tensor:
    """The fixed held-out blocks: the first EVAL_BLOCKS blocks of the test split (Persuasion)."""
    from ppn_bayes.data.corpus import token_blocks

    return token_blocks(tokenizer, "test", BLOCK, "bundled", max_blocks=EVAL_BLOCKS)


def _train_dense(model, blocks: torch.Tensor, steps: int, lr: float, seed: int, warmup: int, batch: int = 16
                 ) -> float:
    """Plain next-token training (AdamW, cosine after linear warmup, clip 1.0); returns the last batch loss."""
    import torch.nn.functional as F

    from ppn_bayes.training.schedule import lr_multiplier

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        ids = blocks[torch.randint(0, blocks.shape[0], (batch,), generator=gen)]
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * lr_multiplier(step, steps, warmup, "cosine")
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def pretrain_base(path: Path, tokenizer, steps: int = 400, lr: float = 3e-3, seed: int = 0) -> dict:
    """Pretrain the base Llama with plain next-token loss on the train split; save it to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppn_bayes.data.corpus import token_blocks

    blocks = token_blocks(tokenizer, "train", BLOCK, "bundled")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **BASE_CONFIG))
    tic = time.perf_counter()
    last = _train_dense(model, blocks, steps, lr, seed, warmup=20)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"steps": steps, "train_blocks": int(blocks.shape[0]), "last_batch_loss": last,
            "seconds": time.perf_counter() - tic}


def continue_dense(base_dir: Path, path: Path, tokenizer, steps: int = 300, lr: float = 1e-3, seed: int = 1) -> Path:
    """Control: the base trained densely for as many more steps as the joint run, same LR and batch."""
    from ppn_bayes.data.corpus import token_blocks
    from ppn_bayes.hub.zoo import load_model

    model, _ = load_model(base_dir, dtype=torch.float32, device="cpu")
    _train_dense(model, token_blocks(tokenizer, "train", BLOCK, "bundled"), steps, lr, seed, warmup=10)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_recipe(base_dir: Path, name: str = "push-evidence", **overrides):
    """The joint run's recipe (:data:`RUN`, sections updated by ``overrides``: ``push={...}`` etc.)."""
    from ppn_bayes.config import recipe_from_dict

    spec = {k: dict(v) for k, v in RUN.items()}
    for section, values in overrides.items():
        spec.setdefault(section, {}).update(values)
    return recipe_from_dict({"name": name, "model": {"name": str(base_dir)},
                             "data": {"corpus": "bundled", "block_size": BLOCK, "val_blocks": 16}, **spec})


def norm_keepsets(model, sizes=SIZES, kinds=("heads", "groups"), group_size: int = 32):
    """The weight-norm baseline: nested keep-sets of ``model`` at ``sizes`` (fractions of decoder params).

    Score of a unit = its Frobenius norm centred per kind on the log scale (``log r_u - mean log r``),
    the score the PPN run starts from; units leave from the lowest score up (one order, so keep-sets
    nest); each keep-set is the longest prefix within the exact budget (``UnitInventory.kept_cost``).
    Returns ``({size: KeepSet}, inventory)``.
    """
    from ppn_bayes.baselines import full_inventory, gated_view, keepsets_from_order
    from ppn_bayes.bayes.prior import centred_log_norms

    with gated_view(model, group_size, kinds=tuple(kinds)) as g:
        z = centred_log_norms(g.unit_norms())
        inv = full_inventory(g.inventory)
    units, keys = [], []
    if "heads" in kinds:
        for (l, h), v in zip(((l, h) for l in range(inv.num_layers) for h in range(inv.num_heads)),
                             z["heads"].flatten().tolist()):
            units.append(("heads", (l, h)))
            keys.append(v)
    if "groups" in kinds:
        for (l, k), v in zip(((l, k) for l in range(inv.num_layers) for k in range(inv.num_groups)),
                             z["groups"].flatten().tolist()):
            units.append(("groups", (l, k)))
            keys.append(v)
    order = [units[i] for i in sorted(range(len(units)), key=lambda i: keys[i])]
    return keepsets_from_order(inv, order, sizes), inv


def norm_losses(base_dir: Path, blocks: torch.Tensor, sizes=SIZES, group_size: int = 32) -> dict[float, dict]:
    """Held-out NLL of the base model pruned by weight norm at each size."""
    from ppn_bayes.backbone.gated import gate
    from ppn_bayes.backbone.perplexity import perplexity
    from ppn_bayes.hub.zoo import load_model

    model, _ = load_model(base_dir, dtype=torch.float32, device="cpu")
    keeps, inv = norm_keepsets(model, sizes, group_size=group_size)
    gated = gate(model, group_size=group_size, kinds=("heads", "groups"))
    out = {}
    for s, keep in keeps.items():
        with gated.keep(keep):
            out[s] = {"loss": perplexity(gated, blocks, batch_size=16)["nll"], "size": inv.size_of(keep)}
    gated.remove_hooks()
    return out


def run_losses(run, blocks: torch.Tensor, sizes=SIZES) -> dict:
    """Held-out NLL of the run's network at each size (``load_run_target``) and dense (lambda = 0)."""
    from ppn_bayes.backbone.perplexity import perplexity
    from ppn_bayes.evaluation.targets import load_run_target

    out: dict = {"dense": perplexity(load_run_target(run, dense=True).model, blocks, batch_size=16)["nll"]}
    for s in sizes:
        t = load_run_target(run, size=s)
        out[s] = {"loss": perplexity(t.model, blocks, batch_size=16)["nll"], "size": t.info["achieved_size"],
                  "lambda": t.info["lambda"]}
    return out


def base_loss(base_dir: Path, blocks: torch.Tensor) -> float:
    from ppn_bayes.backbone.perplexity import perplexity
    from ppn_bayes.hub.zoo import load_model

    model, _ = load_model(base_dir, dtype=torch.float32, device="cpu")
    return perplexity(model, blocks, batch_size=16)["nll"]


def evidence(work: Path, tokenizer, pretrain_steps: int = 400, run_steps: int = 300) -> dict:
    """The whole comparison; returns the figures (losses in nats per token)."""
    from ppn_bayes.run import fit

    base_dir = work / "base"
    if not (base_dir / "config.json").is_file():
        pre = pretrain_base(base_dir, tokenizer, steps=pretrain_steps)
    else:
        pre = {"reused": str(base_dir)}
    blocks = eval_blocks(tokenizer)
    tic = time.perf_counter()
    run = fit(run_recipe(base_dir, train={"steps": run_steps}), out=work / "run", progress=False)
    fit_s = time.perf_counter() - tic
    ours = run_losses(run, blocks)
    norm = norm_losses(base_dir, blocks)
    return {"pretrain": pre, "fit_seconds": fit_s, "base_dense": base_loss(base_dir, blocks),
            "run_dense": ours["dense"],
            "sizes": {str(s): {"run": ours[s], "norm": norm[s]} for s in SIZES}, "run_dir": str(run.path)}


# ------------------------------------------------------------------------------------ investigation


@torch.no_grad()
def price_sweep(run, blocks: torch.Tensor, lambdas=(0.25, 0.5, 1.0, 2.0, 4.0),
                grid=(0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)) -> dict:
    """For each price: the push's own choice vs the best member of its family for ``NLL + lambda * size``.

    The family is the hard sub-network at price ``x`` (units whose own inclusion probability at the
    median scores is > 1/2, nested, amplitude corrections at ``x``: what the training loop evaluates)
    for ``x`` in ``grid``; size is the kept fraction of decoder FLOPs (the push's currency).
    """
    from ppn_bayes.backbone.perplexity import perplexity

    post = run.posterior
    push, inv = post.push, run.inventory
    gated = run.load_model()
    scores = post.median_scores()

    def member(x: float) -> dict:
        rho = push.inclusion(scores, x)
        own = push.unnest(rho)
        masks = {k: (v > 0.5).float() for k, v in own.items()}
        keep = inv.keepset_from_masks(push.nest(masks))
        with gated.gates(**push.gates(masks if x > 0 else None, x)):
            nll = perplexity(gated, blocks, batch_size=16)["nll"]
        return {"price": x, "size": inv.size_of(keep, "flops"), "expected_size": float(push.expected_size(rho)),
                "loss": nll}

    family = [member(x) for x in sorted(set(grid) | set(lambdas))]
    by_price = {m["price"]: m for m in family}
    out = []
    for lam in lambdas:
        best = min(family, key=lambda m: m["loss"] + lam * m["size"])
        own = by_price[lam]
        out.append({"lambda": lam, "push_size": own["size"], "push_expected_size": own["expected_size"],
                    "push_loss": own["loss"], "push_objective": own["loss"] + lam * own["size"],
                    "best_size": best["size"], "best_loss": best["loss"],
                    "best_objective": best["loss"] + lam * best["size"]})
    return {"family": family, "prices": out}


def elbo_scaling(run) -> dict:
    """Max |logged ELBO + (token_loss + lambda * expected_size + kl)| over training steps (per token)."""
    worst = 0.0
    for r in run.train_metrics():
        lhs = -r["elbo"]
        rhs = r["token_loss"] + r["lambda"] * r["expected_size"] + r["kl"]
        worst = max(worst, abs(lhs - rhs), abs(r["compute"] + r["lambda"] * r["expected_size"]))
    return {"max_abs_gap": worst, "steps": len(run.train_metrics())}


def investigate(work: Path, tokenizer, run_steps: int = 300, frozen: bool = True) -> dict:
    """Sweeps for three training distributions of lambda on the same base (weights frozen, as in the demo)."""
    import ppn_bayes.bayes.model as model_mod
    from ppn_bayes.run import fit

    base_dir = work / "base"
    if not (base_dir / "config.json").is_file():
        pretrain_base(base_dir, tokenizer)
    blocks = eval_blocks(tokenizer)
    weights = {"weights": "frozen"} if frozen else {}
    variants = {"exp0.3": {"push": {"rate": 0.3}}, "exp3": {"push": {"rate": 3.0}},
                "fixed1": {"push": {"rate": 1.0, "p_dense": 0.0}}}
    out = {}
    original = model_mod.draw_lambda
    for name, ov in variants.items():
        if name == "fixed1":
            model_mod.draw_lambda = lambda config, generator=None: 1.0  # every step at lambda = 1
        try:
            run = fit(run_recipe(base_dir, name=name, train={"steps": run_steps, **weights}, push=ov["push"]),
                      out=work / f"inv-{name}-{'frozen' if frozen else 'full'}", progress=False)
        finally:
            model_mod.draw_lambda = original
        out[name] = {"sweep": price_sweep(run, blocks), "elbo_scaling": elbo_scaling(run)}
    return out


def threshold_shift_check(run_dir: str, lam: float = 1.0, k: int = 12, shifts=(-0.5, -0.25, 0.0, 0.25, 0.5)) -> dict:
    """At a trained run's state and price ``lam``: E[NLL] of the *sampled* masks (the training objective's
    likelihood term) when every threshold is shifted by ``delta``, with common random numbers, next to
    the straight-through estimate of its slope at ``delta = 0`` (4 train blocks, ``k`` mask draws)."""
    from ppn_bayes.bayes.model import sequence_nll
    from ppn_bayes.data.corpus import token_blocks
    from ppn_bayes.run import load_run

    run = load_run(run_dir)
    post = run.posterior
    push = post.push
    gated = run.load_model()
    gated.model.eval()
    train = token_blocks(run.load_tokenizer(), "train", run.recipe.data.block_size, run.recipe.data.corpus)
    ids = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[:4]]
    scores, T = post.median_scores(), push.config.temperature

    def own_probs(delta):
        tau = push.thresholds(lam)
        return {kd: torch.sigmoid((scores[kd] - (tau[kd] if kd == "layers" else tau[kd].unsqueeze(-1)).detach()
                                   - delta) / T) for kd in push.kinds}

    def nll_of(masks):
        with gated.gates(**push.gates(masks, lam)):
            n, c = sequence_nll(gated(input_ids=ids).logits, ids, None)
        return n.sum() / c.sum()

    us = [{kd: torch.rand(v.shape, generator=torch.Generator().manual_seed(100 * i + j))
           for j, (kd, v) in enumerate(scores.items())} for i in range(k)]
    delta = torch.zeros((), requires_grad=True)
    st = []
    for u in us:
        own = own_probs(delta)
        m = {kd: (u[kd] < own[kd].detach()).float() + own[kd] - own[kd].detach() for kd in own}
        st.append(float(torch.autograd.grad(nll_of(m), delta)[0]))
    e_nll, rho_bar = {}, {}
    with torch.no_grad():
        for h in shifts:
            own = own_probs(torch.tensor(h))
            e_nll[h] = sum(float(nll_of({kd: (u[kd] < own[kd]).float() for kd in own})) for u in us) / k
            rho_bar[h] = float(push.expected_size(push.nest(own)))
    return {"lambda": lam, "E_nll": e_nll, "rho_bar": rho_bar, "st_slope": sum(st) / k,
            "st_slope_sd": float(torch.tensor(st).std()),
            "fd_slope": (e_nll[shifts[-2]] - e_nll[shifts[1]]) / (shifts[-2] - shifts[1])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--investigate", action="store_true")
    p.add_argument("--shift-check", metavar="RUN_DIR", default=None,
                   help="only: the threshold-shift check of E[NLL] at lambda = 1 on a finished run")
    p.add_argument("--control", action="store_true",
                   help="also: the base trained densely for --steps more steps, then pruned by norm")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.shift_check:
        print(json.dumps(threshold_shift_check(a.shift_check), indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.out) if a.out else Path(tmp)
        tok = make_tokenizer()
        res = {"evidence": evidence(work, tok, a.pretrain_steps, a.steps)}
        if a.control:
            blocks = eval_blocks(tok)
            ctrl = continue_dense(work / "base", work / "base-plus-dense", tok, steps=a.steps)
            res["control_dense_then_norm"] = {"dense": base_loss(ctrl, blocks),
                                              **{str(s): v for s, v in norm_losses(ctrl, blocks).items()}}
        if a.investigate:
            res["investigation"] = investigate(work, tok, a.steps)
    print(json.dumps(res, indent=1, default=lambda x: x if not isinstance(x, float) or math.isfinite(x) else None))


if __name__ == "__main__":
    main()
