"""raycyto.tune: cross-validated sweeps on Ray Tune.

Modules: ``features`` (frozen-backbone feature cache), ``train`` (training loops),
``trainable`` (the per-trial K-fold loop), ``search`` / ``searchers`` (per-cell Bayesian
search), ``sweep`` (driver writing the experiment directory), ``cli`` (``raycyto sweep``).
Nothing is imported here so ``import raycyto.tune`` stays light.
"""
