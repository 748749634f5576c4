"""Every method on the same model, calibration and test data, in one table (``ppn compare``).

Fairness, by construction:

* **Same tokens.** Every peer is calibrated on the same calibration blocks (a seeded draw from the
  train split), and every row is evaluated on the same held-out test blocks with the same
  :func:`ppn_bayes.backbone.perplexity.perplexity`. GISP with the margin objective (``gisp_objective="margin"``,
  rows ``gisp-margin``) calibrates on choice examples instead; ``ppn compare`` cuts them from the
  train novels by the shipped cloze task's rules (:mod:`ppn_bayes.data.tasks.choices`), never from the
  task's evaluated items.
* **Same currency.** A size is the fraction of *decoder* parameters kept
  (:meth:`UnitInventory.size_of`); embeddings and the LM head are never pruned and not counted. Each
  row reports the size it *achieved* (``param_fraction``, ``<=`` the request for every method but
  PrunePath, whose per-token active fraction is measured on the test blocks) and its FLOPs fraction.
* **As published, optionally healed.** Peers run as their papers describe, without retraining;
  ``heal_tokens > 0`` fine-tunes every pruned model on the same number of held-out *train* tokens
  (disjoint from the calibration blocks), keeping its sparsity, where a comparison needs it.
* **Cost counted.** ``cost_seconds`` is the wall time that produced a row's model. GISP, ShortGPT,
  random and PrunePath produce every size in one run (``one_run_for_all_sizes``), Wanda and
  SparseGPT run once per size; ``costs`` sums what each method spent for all sizes. PPN: one run.

The modules, along the data flow of one comparison: :mod:`~ppn_bayes.compare.options` (the methods
and :class:`~ppn_bayes.compare.options.CompareOptions`), :mod:`~ppn_bayes.compare.healing` (healing a
pruned model), :mod:`~ppn_bayes.compare.bench` (the shared data, dense reference and decode timing),
:mod:`~ppn_bayes.compare.rows` (one method's rows, PPN's from a run), :mod:`~ppn_bayes.compare.comparison`
(:func:`~ppn_bayes.compare.comparison.compare`, every method into one result) and
:mod:`~ppn_bayes.compare.outputs` (the Markdown table, the plot and the files of ``--out``).
"""
