"""The :class:`Run` users hold: a run directory with the analysis steps as methods.

:class:`~ppn_bayes.training.rundir.RunDir` is the run directory as every later step reads it (recipe,
manifest, posterior, metrics, trained model; its format and crash-safe checkpoints are documented
there). :class:`Run` adds what a notebook reaches for after training: keep-sets at a size,
inclusion probabilities, the Markdown report, predictive uncertainty, arviz export and the plots. Each
method is one call into the module that owns the step, so this file sits at the top of the package,
the one room that may import all of them. :func:`fit` and :func:`load_run` return a :class:`Run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ppn_bayes.analysis.plots import plot_layer_forest, plot_puppet, plot_traces, plot_unit_heatmaps
from ppn_bayes.analysis.report import write_report
from ppn_bayes.analysis.uncertainty import run_uncertainty
from ppn_bayes.bayes.diagnostics import to_inference_data
from ppn_bayes.bayes.keepsets import keepset, keepsets
from ppn_bayes.config import Recipe
from ppn_bayes.training import loop
from ppn_bayes.training.rundir import RunDir
from ppn_bayes.training.session import Session


class Run(RunDir):
    """A run directory with the analysis steps as methods (see the module docstring)."""

    def keepset(self, size=None, params=None, layers=None, flops=None, quantile: float = 0.5, num_draws: int = 256,
                seed: int = 0):
        """The nested keep-set at one target size: :func:`ppn_bayes.bayes.keepsets.keepset`."""
        return keepset(self.posterior, size, params, layers, flops, quantile, num_draws, seed)

    def keepsets(self, sizes, quantile: float = 0.5, num_draws: int = 256, seed: int = 0, currency: str = "size"):
        """Keep-sets at several sizes from one set of draws (nested): :func:`ppn_bayes.bayes.keepsets.keepsets`."""
        return keepsets(self.posterior, sizes, quantile, num_draws, seed, currency)

    def inclusion(self, size=None, params=None, layers=None, flops=None, quantile: float = 0.5,
                  num_draws: int = 256, seed: int = 0):
        """Per-unit inclusion probabilities at a size: :func:`ppn_bayes.bayes.keepsets.inclusion`."""
        return self.keepset(size, params, layers, flops, quantile, num_draws, seed).inclusion

    def report(self, sizes=(0.25, 0.5, 0.75), num_draws: int = 256, quantile: float = 0.5, seed: int = 0, out=None,
               overwrite: bool = False, band_samples: int = 0, band_blocks: int = 4, device: str = "cpu"):
        """Write report.md, plots, keepsets.json and posterior.nc: :func:`ppn_bayes.analysis.report.write_report`
        (``band_samples`` > 0: each keep-set's held-out loss with a band over that many sampled sub-networks)."""
        return write_report(self, sizes, num_draws, quantile, seed, out, overwrite, band_samples, band_blocks, device)

    def uncertainty(self, size=None, k: int = 8, blocks: int = 4, device: str = "cpu", **target):
        """Posterior predictive over k sampled sub-networks: :func:`ppn_bayes.analysis.uncertainty.run_uncertainty`."""
        return run_uncertainty(self, size=size, k=k, blocks=blocks, device=device, **target)

    def to_arviz(self, num_draws: int = 1000, seed: int = 0):
        """Posterior draws of every latent as arviz InferenceData: :func:`ppn_bayes.bayes.diagnostics.to_inference_data`."""
        return to_inference_data(self.posterior, num_draws=num_draws, seed=seed)

    def plot_traces(self, stem=None):
        """ELBO and token-loss traces (PNG + SVG); returns the paths."""
        return plot_traces(self.metrics, stem or self.path / "plots" / "traces")

    def plot_layer_scores(self, stem=None, num_draws: int = 256, lam: float | None = None):
        """Forest plot of layer scores with credible intervals (and tau_l(lam) if given)."""
        draws = self.posterior.draws(num_draws)
        tau = self.posterior.thresholds(lam)["layers"] if lam is not None else None
        return plot_layer_forest(draws["layers"], stem or self.path / "plots" / "layer_forest", tau, lam)

    def plot_heads(self, stem=None, num_draws: int = 256):
        """Layer x head heat maps of the posterior mean and sd of head scores."""
        return plot_unit_heatmaps(self.posterior.draws(num_draws)["heads"], stem or self.path / "plots" / "head_heatmaps")

    def plot_puppet(self, sizes=(0.25, 0.5, 0.75), stem=None, num_draws: int = 256, quantile: float = 0.5):
        """The puppet chart: keep-sets across sizes shaded by inclusion probability."""
        return plot_puppet(self.keepsets(list(sizes), quantile, num_draws), stem or self.path / "plots" / "puppet")


def load_run(path: str | os.PathLike[str] | RunDir) -> Run:
    """Open a run directory written by :func:`fit`, checked as a whole (:meth:`Run.check`).

    A :class:`Run` passes through unchanged (it was checked when it was opened), so functions that take
    "a run or its directory" call this once instead of testing the type themselves.
    """
    if isinstance(path, Run):
        return path
    return Run(path.path if isinstance(path, RunDir) else path).check()


def fit(recipe: Recipe | str | os.PathLike | None = None, out: str | os.PathLike | None = None,
        resume: bool = False, progress: bool = True, overrides: list[str] | None = None,
        callbacks: list[Callable[[Session, int], None]] | None = None) -> Run:
    """Train a push puppet network (:func:`ppn_bayes.training.loop.fit`: the arguments are documented
    there) and open the finished run as a :class:`Run`."""
    return Run(loop.fit(recipe, out, resume=resume, progress=progress, overrides=overrides, callbacks=callbacks).path)
