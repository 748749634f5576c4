"""The SVI loop: the guide, the push and the LM's weights, optimized jointly by one ELBO.

``fit(recipe)`` builds the Pyro model (:class:`~ppn_bayes.bayes.model.PPNModel`) around a gated base model,
the guide over the score latents, optionally LoRA adapters or the full decoder weights, and runs SVI
with AdamW. Choices, and why:

* **Per-token objective.** The loss is ``-ELBO / N_tokens`` (``N_tokens`` = the training set's predicted
  tokens). It has the same gradients' *direction* as ``-ELBO`` but an O(1) scale, so learning rates and
  gradient clipping mean the same thing for a 100k-token demo and a 5B-token run.
* **The ELBO is computed term by term** (:func:`elbo_terms`, the same sums that ``Trace_ELBO`` forms for
  reparameterized sites; a test checks they agree): the ``tokens`` factor (likelihood), the ``compute``
  factor (the push's price) and ``kl`` (``log q - log p`` of the score latents). Each term is checked
  for NaN/inf at every step, as is each parameter group's gradient norm, so a failure names its cause.
* **Noise is a function of (seed, step).** Before every micro-batch the torch RNG (guide samples) and
  the model's lambda/mask generator are re-seeded from ``(seed, step)``, and the batch's sequences are
  a pure function of ``(seed, step)`` too (a seeded permutation per epoch). Hence a resumed run replays
  exactly what an uninterrupted one does; gradient accumulation over micro-batches that share one
  draw of lambda, masks and latents is exactly a larger batch; and data-parallel ranks (each with its
  shard of the global batch, the plate given the full data set size) reproduce a single process.
* **Parameter groups**: ``guide`` (lr_guide), ``push`` (splines, amplitudes, score levels; lr_push),
  ``weights`` (LoRA adapters or the decoder's matrices; lr_weights and weight decay) and
  ``weights_nodecay`` (the decoder's norms and biases). Only ``weights`` decays.

The other steps of a run live next door: :mod:`ppn_bayes.training.distributed` (torchrun process group,
DDP/FSDP wrapping, collectives), :mod:`ppn_bayes.training.checkpoint` (save/restore of the session, the
run's exports) and :mod:`ppn_bayes.training.heldout` (the held-out evaluation logged during training).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.distributed as dist

from ppn_bayes.bayes.guides import guide_summary
from ppn_bayes.config import Recipe, apply_overrides, load_recipe, recipe_from_dict
from ppn_bayes.device import synchronize
from ppn_bayes.errors import ConfigError, NumericalError, OutputError, RunError
from ppn_bayes.files import check_no_overlap, check_owned, check_writable, writer_lock
from ppn_bayes.hub.zoo import model_identity
from ppn_bayes.training import averaging, checkpoint_files, rundir
from ppn_bayes.training.build import build, group_hparams
from ppn_bayes.training.checkpoint import restore, save
from ppn_bayes.training.distributed import (
    average_replicated_grads,
    barrier,
    grad_norm,
    init_distributed,
    is_sharded,
    reduce_mean,
)
from ppn_bayes.training.heldout import evaluate
from ppn_bayes.training.sandwich import sandwich_prices
from ppn_bayes.training.schedule import (
    batch_indices,
    group_multiplier,
    guide_lr_spent,
    in_settle,
    step_seed,
    total_steps,
)
from ppn_bayes.training.session import Session
from ppn_bayes.training.settle import settle_keepsets
from ppn_bayes.version import __version__


def log_guide(s: Session, step: int) -> dict[str, Any] | None:
    """Append the ``guide`` record (guides.guide_summary) for the state after ``step`` steps."""

    summary = guide_summary(s.guide, s.ppn.prior, s.guide_init)
    if not summary:
        return None
    record = {"type": "guide", "step": step, "lr_sum": guide_lr_spent(s.recipe.train, step),
              "phase": "guide" if step > s.recipe.train.steps else "joint", **summary}
    rundir.append_metrics(s.run_dir, record)
    return record


def log_average(s: Session, step: int, numbers: dict[str, Any] | None) -> None:
    """Append the ``guide_average`` record (training.averaging.apply's numbers and guides.guide_summary of
    the exported, averaged guide); nothing when averaging is off."""
    if numbers is not None and s.main:
        rundir.append_metrics(s.run_dir, {"type": "guide_average", "step": step, **numbers,
                                          **guide_summary(s.guide, s.ppn.prior, s.guide_init)})


# ------------------------------------------------------------------------------------- one step


def _fork_rng(device: torch.device):
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _check_terms(s: Session, terms: dict[str, float], step: int) -> None:
    bad = [f"{k}={terms[k]}" for k in ("tokens", "compute", "kl") if not math.isfinite(terms[k])]
    if bad:
        raise NumericalError(
            f"non-finite ELBO term at step {step}: {', '.join(bad)} (tokens = likelihood, compute = the push's "
            f"price, kl = score prior vs guide); the last good checkpoint is kept: resume with a lower learning "
            f"rate, e.g. ppn fit --resume --out {s.run_dir} --set train.lr_guide={s.recipe.train.lr_guide / 4:g} "
            f"--set train.lr_weights={s.recipe.train.lr_weights / 4:g}")


def _grad_norms(s: Session, step: int) -> dict[str, float]:
    norms = {}
    for name, params in s.groups.items():
        for p in params:
            if p.grad is None:  # unused this step (e.g. the splines on a dense step): a zero gradient
                p.grad = torch.zeros_like(p)
        if is_sharded(s):
            norms[name] = grad_norm(params)
        else:
            norms[name] = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))
    bad = [f"{k}={v}" for k, v in norms.items() if not math.isfinite(v)]
    if bad:
        lr_key = {"guide": "lr_guide", "push": "lr_push"}.get(bad[0].split("=")[0], "lr_weights")
        raise NumericalError(
            f"non-finite gradient at step {step} in parameter group {', '.join(bad)}; the last good checkpoint "
            f"is kept: resume with a lower learning rate, e.g. ppn fit --resume --out {s.run_dir} "
            f"--set train.{lr_key}={getattr(s.recipe.train, lr_key) / 4:g}")
    return norms


def train_step(s: Session, step: int) -> dict[str, Any]:
    """One optimizer step (``grad_accum`` micro-batches sharing one draw of the noise); returns its record.

    With ``train.sandwich`` every micro-batch runs one pass per price of :func:`sandwich_prices` (dense
    first), each with its own noise seeded by ``(seed, step, pass)``, the losses averaged into the one
    optimizer step; with distillation from the dense network, the dense pass's logits (detached) are
    the teacher's for the pruned passes (no extra forward pass). In the settle phase
    (``training/settle.py``) the pruned passes train the sandwich sizes' exported keep-sets instead."""
    t = s.recipe.train
    seed = step_seed(t.seed, step)
    per_rank = t.batch_size // s.world
    sums = {"tokens": 0.0, "compute": 0.0, "kl": 0.0, "loss": 0.0, "token_loss": 0.0}
    settling = in_settle(t, step)
    if settling:  # the dense pass, then each size's fixed keep-set at its lambda*
        if s.settle is None:
            s.settle = settle_keepsets(s)  # once: the guide and the push are frozen from here on
        prices = [0.0, *(lam for lam, _, _ in s.settle)]
    else:
        prices = sandwich_prices(s, step) if t.sandwich else [None]
    n = len(prices)
    passes: list[dict[str, float]] = [{} for _ in prices]
    kl_tok: list[float] = []
    reuse_dense = t.teacher == "self" or t.weights == "frozen"  # the dense pass is the teacher
    tic = time.perf_counter()
    for micro in range(t.grad_accum):
        idx = batch_indices(t.seed, step, micro, t.grad_accum, t.batch_size, s.train_blocks.shape[0])
        mine = idx[s.rank * per_rank:(s.rank + 1) * per_rank]
        ids = s.train_blocks[mine].to(s.device, non_blocking=True)
        teacher = None
        if t.sandwich and t.distill_weight > 0 and not reuse_dense:
            teacher = s.ppn.teacher_logits(ids)  # once per micro-batch, shared by its pruned passes
        s.ppn.keep_dense_logits = t.sandwich and t.distill_weight > 0 and reuse_dense
        for k, lam in enumerate(prices):
            pass_seed = seed if k == 0 else step_seed(t.seed, step, stream=2 + k)
            last = micro == t.grad_accum - 1 and k == n - 1
            sync = last or s.world == 1 or not hasattr(s.wrapped, "no_sync")
            fixed: dict[str, Any] = {} if lam is None else {"lam": lam}
            if settling and k > 0:
                fixed["keep_masks"] = s.settle[k - 1][1]
            if lam is not None and lam > 0 and t.distill_weight > 0:
                fixed["teacher_logits"] = teacher if teacher is not None else s.ppn.dense_logits
            with _fork_rng(s.device), (contextlib.nullcontext() if sync else s.wrapped.no_sync()):
                torch.manual_seed(pass_seed)
                s.generator.manual_seed(pass_seed ^ 0x5DEECE66D)
                # Distribution argument checks are off in the loop: a NaN must reach the per-term check below
                # (which names the term and the step), not stop as a ValueError deep inside a distribution.
                with pyro.validation_enabled(False):  # bf16 autocast: PPNModel turns it on around the LM alone
                    terms = s.wrapped(ids, mine.to(s.device), **fixed)
                # the step's one host sync: the terms are checked before backward, so a NaN names its term
                values = reduce_mean(s, {k2: float(terms[k2].detach()) for k2 in ("tokens", "compute", "kl", "loss")}
                                      | {"token_loss": float(s.ppn.last.token_loss)})
                _check_terms(s, values, step + 1)
                (terms["loss"] / (t.grad_accum * n)).backward()
            for k2 in sums:
                sums[k2] += values[k2] / (t.grad_accum * n)
            info = s.ppn.last.values()
            if "distill_kl" in info:
                kl_tok.append(info["distill_kl"])
            if t.sandwich:
                p = passes[k]
                p["token_loss"] = p.get("token_loss", 0.0) + values["token_loss"] / t.grad_accum
                p.update(lam=info["lam"], sampled_size=info["sampled_size"], expected_size=info["expected_size"])
                if "distill_kl" in info:
                    p["distill_kl"] = p.get("distill_kl", 0.0) + info["distill_kl"] / t.grad_accum
        s.ppn.keep_dense_logits, s.ppn.dense_logits = False, None
    if is_sharded(s):  # FSDP reduced the shards' gradients; the replicated parameters' are averaged here
        average_replicated_grads(s)
    norms = _grad_norms(s, step + 1)
    params = [p for ps in s.groups.values() for p in ps]
    total_norm = float(torch.linalg.vector_norm(torch.tensor(list(norms.values()))))
    if t.clip_grad > 0 and is_sharded(s):  # clip_grad_norm_'s arithmetic, on the norm computed above
        coef = min(1.0, t.clip_grad / (total_norm + 1e-6))
        for p in params:
            p.grad.mul_(coef)
    elif t.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
    for group in s.optimizer.param_groups:
        group["lr"] = group["base_lr"] * group_multiplier(t, step, group["name"])
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    synchronize(s.device)  # the step's kernels have run: its seconds are its own (the next step would wait anyway)
    s.seconds += time.perf_counter() - tic
    info = s.ppn.last.values() if not t.sandwich else {**passes[1], "lam": passes[1]["lam"]}
    record = {"type": "train", "step": step + 1, "elbo": -sums["loss"], "token_loss": sums["token_loss"],
              "kl": sums["kl"] / s.ppn.num_tokens, "compute": sums["compute"] / s.ppn.num_tokens,
              "lambda": info["lam"], "sampled_size": info["sampled_size"], "expected_size": info["expected_size"],
              "lr": {g["name"]: g["lr"] for g in s.optimizer.param_groups}, "grad_norm": total_norm,
              "grad_norms": norms, "seconds": s.seconds}
    if kl_tok:  # distilled pruned passes: their mean per-token KL to the teacher
        record["distill_kl"] = sum(kl_tok) / len(kl_tok)
    if settling:
        record["settle"] = True
    if t.sandwich:  # lambda/sizes above are the smallest size's pass; every pass's here
        record["prices"] = [p["lam"] for p in passes]
        record["sandwich"] = [{"lambda": p["lam"], "token_loss": p["token_loss"], "sampled_size": p["sampled_size"],
                               "expected_size": p["expected_size"],
                               **({"distill_kl": p["distill_kl"]} if "distill_kl" in p else {})} for p in passes]
    return record


# -------------------------------------------------------------------------------------- the run


def resolve_recipe(recipe: Recipe | str | os.PathLike | None, run_dir: Path | None, resume: bool,
                   overrides: list[str] | None = None) -> Recipe:
    """The recipe to run: the given one (file or object) with overrides; on resume without one, the
    run's own snapshot. On resume the model-defining keys must match the snapshot."""
    overrides = list(overrides or [])
    snapshot = run_dir / rundir.CONFIG if run_dir is not None else None
    if recipe is None:
        if not (resume and snapshot is not None and snapshot.is_file()):
            raise ConfigError("no recipe given; pass a recipe YAML (e.g. inference/smollm2-demo.yaml), or "
                              "--resume with --out pointing at an existing run")
        out = load_recipe(snapshot, overrides)
    elif isinstance(recipe, Recipe):
        out = recipe_from_dict(apply_overrides(recipe.to_dict(), overrides)) if overrides else recipe
    else:
        out = load_recipe(recipe, overrides)
    if resume and snapshot is not None and snapshot.is_file() and recipe is not None:
        changed = rundir.recipe_fields_changed(load_recipe(snapshot), out)
        if changed:
            raise RunError(f"cannot resume {run_dir} with a different {changed[0]} (it defines the model); "
                           "resume without the recipe, or start a new run with another --out")
    return out


def _local(path: str | os.PathLike | None) -> Path | None:
    """``path`` when it names something on disk (a model or corpus given as a path, not an alias)."""
    return Path(path) if path is not None and os.path.lexists(os.path.expanduser(str(path))) else None


def _check_dir(run_dir: Path, resume: bool, recipe: Recipe | None = None,
               recipe_path: str | os.PathLike | None = None) -> None:
    """Before anything is loaded or written: never overwrite a run, a user's files or an input by accident.

    A run directory is either new, empty, or a run (it has a manifest from its first instant, see
    :func:`_init_dir`); anything else is somebody's directory and is never written into, ``--resume``
    or not.
    """

    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file; pass a directory for the run")
    check_writable(run_dir)
    if recipe is not None:
        own_snapshot = recipe_path is not None and Path(recipe_path).resolve() == (run_dir / rundir.CONFIG).resolve()
        check_no_overlap(run_dir, [("recipe", None if own_snapshot else _local(recipe_path)),
                                   ("base model", _local(recipe.model.name)),
                                   ("corpus", _local(recipe.data.corpus))], writes=rundir.RUN_ENTRIES)
    if (run_dir / rundir.MANIFEST).is_file():
        if not resume:
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, or another --out")
        return
    check_owned(run_dir, (), "ppn fit")


def _init_dir(run_dir: Path, recipe: Recipe) -> None:
    """Only once model and data have loaded (bad input must leave nothing behind).

    A new run directory is built under a temporary name with its manifest and recipe and renamed into
    place, so it appears complete or not at all: a kill at any instant leaves either nothing or a run
    that ``ppn fit --resume`` continues, never a directory a plain rerun would refuse as foreign.
    """
    import shutil
    import tempfile

    if not (run_dir / rundir.MANIFEST).is_file():  # new, or empty (_check_dir allows nothing else)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.tmp-", dir=run_dir.parent))
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; a run directory is an ordinary directory
            rundir.update_manifest(tmp, status="starting", steps_done=0)
            rundir.write_config(tmp, recipe)
            os.replace(tmp, run_dir)  # onto an empty directory too
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    checkpoint_files.clean_stale(run_dir)
    rundir.write_config(run_dir, recipe)


def _manifest_start(s: Session) -> None:
    r = s.recipe
    rundir.update_manifest(
        s.run_dir, library={"name": "ppn-bayes", "version": __version__, "torch": torch.__version__,
                            "pyro": pyro.__version__},
        recipe={"name": r.name, "preset": r.preset}, base=model_identity(s.base_path), weights=r.train.weights,
        tempering=r.train.tempering, num_sequences=s.ppn.num_sequences, num_tokens=s.ppn.num_tokens,
        block_size=r.data.block_size, inventory=s.ppn.inventory.describe(), world_size=s.world,
        device=str(s.device), steps_total=total_steps(r.train), status="running", error=None, final_eval=False)


def fit(recipe: Recipe | str | os.PathLike | None = None, out: str | os.PathLike | None = None,
        resume: bool = False, progress: bool = True, overrides: list[str] | None = None,
        callbacks: list[Callable[[Session, int], None]] | None = None) -> rundir.RunDir:
    """Train a push puppet network from a recipe and return the finished run directory (:class:`~ppn_bayes.training.rundir.RunDir`; :func:`ppn_bayes.run.fit` returns it as a :class:`~ppn_bayes.run.Run`).

    ``recipe``: a :class:`Recipe`, a YAML path, or ``None`` to resume ``out`` from its snapshot.
    ``out``: the run directory (default ``runs/<recipe name>``). ``resume``: continue from the last
    checkpoint in ``out`` (starts fresh if there is none). ``overrides``: ``["train.steps=20", ...]``.
    ``callbacks``: functions ``(session, step)`` called before each step (tests use them to inject faults).
    Under ``torchrun`` every rank calls this; rank 0 writes the run directory.
    """
    run_dir = Path(out) if out is not None else None
    if run_dir is not None and resume:  # before a snapshot is read from it: a foreign config.yaml is none
        _check_dir(run_dir, resume)
    r = resolve_recipe(recipe, run_dir, resume, overrides)
    run_dir = run_dir or Path("runs") / r.name
    recipe_path = recipe if isinstance(recipe, (str, os.PathLike)) else None
    _check_dir(run_dir, resume, r, recipe_path)  # before the lock file is made next to it
    rank, world, device, started = init_distributed(r.train.device)
    try:
        with _run_lock(run_dir, rank, world):
            _check_dir(run_dir, resume, r, recipe_path)  # again, now that no other writer can change it
            new = not (run_dir / rundir.MANIFEST).is_file()  # this call makes the run (dir absent or empty)
            existed = run_dir.is_dir()
            try:
                return _fit(r, run_dir, rank, world, device, resume, progress, callbacks or [])
            except BaseException as err:
                if rank == 0 and new:
                    _discard_unstarted(run_dir, err, existed)
                raise
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _run_lock(run_dir: Path, rank: int, world: int):
    """The run directory's writer lock (:func:`ppn_bayes.files.writer_lock`), held by rank 0 only.

    Under torchrun every rank learns whether rank 0 got it, so a refused lock stops all ranks with the
    same one-line error instead of leaving the others waiting in a collective.
    """

    with contextlib.ExitStack() as stack:
        refused = None
        if rank == 0:
            try:
                stack.enter_context(writer_lock(run_dir, "ppn fit"))
            except OutputError as err:
                refused = str(err)
        if world > 1:
            box = [refused]
            dist.broadcast_object_list(box, src=0)
            refused = box[0]
        if refused is not None:
            raise OutputError(refused)
        yield


def _discard_unstarted(run_dir: Path, err: BaseException, existed: bool) -> None:
    """A run this call created that failed before its first checkpoint holds nothing worth resuming:
    remove it (back to the empty directory it was, if it ``existed``), so that a plain rerun (the
    input fixed) starts clean. Ctrl-C and NaN keep theirs, as documented (their message says resume)."""
    import shutil

    if isinstance(err, (KeyboardInterrupt, NumericalError)) or not run_dir.is_dir():
        return
    if checkpoint_files.find_checkpoint(run_dir) is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        if existed:
            run_dir.mkdir(exist_ok=True)


def _fit(r: Recipe, run_dir: Path, rank: int, world: int, device: torch.device, resume: bool, progress: bool,
         callbacks: list) -> rundir.RunDir:
    if resume and _already_finished(run_dir, total_steps(r.train)):
        return rundir.open_run(run_dir)
    # The checkpoint is read and validated before the model loads, and restored (its shapes checked
    # against the session) before the run directory is touched: a damaged checkpoint changes nothing.
    ckpt_dir = checkpoint_files.find_checkpoint(run_dir) if resume else None
    ckpt = checkpoint_files.load_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    s = build(r, run_dir, rank, world, device)
    start = 0
    if ckpt is not None:
        start = restore(s, ckpt)
        for group in s.optimizer.param_groups:  # the recipe may have changed LRs (e.g. after a NaN)
            group.update(group_hparams(s.recipe, group["name"]))
    if s.main:
        _init_dir(run_dir, r)
    barrier(s)
    if s.main:
        rundir.truncate_metrics(run_dir, start)
        _manifest_start(s)
        rundir.update_manifest(run_dir, steps_done=start)
    barrier(s)
    t = r.train
    total = total_steps(t)
    if start == 0:
        evaluate(s, 0)
        if s.main:
            log_guide(s, 0)
    bar = _progress(progress and s.main, total, start)
    step = start
    try:
        for step in range(start, total):
            for cb in callbacks:
                cb(s, step)
            record = train_step(s, step)
            if s.main:
                rundir.append_metrics(run_dir, record)
            _update_bar(bar, record, t.log_every)
            done = step + 1
            averaging.accumulate(s, done)
            if s.main and (done % t.log_every == 0 or done == total):
                log_guide(s, done)
            if done == total:
                log_average(s, done, averaging.apply(s))
            if t.eval_every and done % t.eval_every == 0 and done < total:
                evaluate(s, done)
            if done % t.checkpoint_every == 0 or done == total:
                save(s, done)
        if start >= total and ckpt_dir is None:
            save(s, total)
        evaluate(s, total)
    except BaseException as err:
        if s.main:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the run
                rundir.update_manifest(run_dir, status=status, error=str(err) or type(err).__name__)
        raise
    finally:
        if bar is not None:
            bar.close()
    if s.main:
        rundir.update_manifest(run_dir, status="finished", steps_done=total, error=None, final_eval=True)
    barrier(s)
    return rundir.open_run(run_dir)


def _already_finished(run_dir: Path, steps: int) -> bool:
    """A finished run asked to resume for no more steps than it has: nothing to do."""
    path = run_dir / rundir.MANIFEST
    if not path.is_file():
        return False
    m = rundir.read_json(path)
    return m.get("status") == "finished" and bool(m.get("final_eval")) and int(m.get("steps_done", -1)) == steps


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="ppn fit", unit="step", dynamic_ncols=True)


def _update_bar(bar, record: dict, every: int) -> None:
    if bar is None:
        return
    bar.update(1)
    if record["step"] % every == 0 or record["step"] == bar.total:
        bar.set_postfix(elbo=f"{record['elbo']:.3f}", tok=f"{record['token_loss']:.3f}",
                        lam=f"{record['lambda']:.2f}", size=f"{record['sampled_size']:.2f}",
                        E_size=f"{record['expected_size']:.2f}", refresh=False)
