"""Experiments behind ``python -m curvrate_fast demo`` and ``python -m curvrate_fast reproduce``.

- :mod:`curvrate_fast.experiments.two_moons`: the paper's Two Moons protocol (data, model,
  training with or without CRR, the boundary-band λ), for our Taylor-mode engine and for the
  nested-autograd baseline.
- :mod:`curvrate_fast.experiments.reproduce`: the CRR sweep, the label-noise rows and the n_max
  ablation of SPEC.md §6, printed beside the paper's numbers; the analytic table of SPEC.md §5.
- :mod:`curvrate_fast.experiments.demo`: the two-minute demo (one run without, one with CRR).
- :mod:`curvrate_fast.experiments.plotting`: the figures (matplotlib, Agg backend).

scikit-learn, matplotlib and tqdm are optional (``pip install curvrate-fast[experiments]``):
without scikit-learn the built-in replicas of ``make_moons``/``train_test_split`` give the same
data; without matplotlib no figure is written; without tqdm progress is printed as lines.
"""
