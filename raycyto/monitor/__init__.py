"""raycyto.monitor: drift of served answers against the model's validation reference.

- :mod:`raycyto.monitor.drift`: the reference stored in model.json at export, the statistics and
  their two-sample tests, the rolling :class:`~raycyto.monitor.drift.DriftWatch` behind Serve's
  ``raycyto_drift`` gauge.
- :mod:`raycyto.monitor.core`: audit-log reading and the windowed comparison of ``raycyto monitor``.
- :mod:`raycyto.monitor.cli`: the ``raycyto monitor`` command.
"""

DEFAULT_WINDOW = 200
"""Answers per window (``raycyto monitor --window``; Serve's drift gauge)."""
DEFAULT_MIN_WINDOW = 50
"""The smallest last, partial window ``raycyto monitor`` tests."""
DEFAULT_ALPHA = 0.05
"""False-alarm rate of a whole log (Bonferroni over its tests)."""
