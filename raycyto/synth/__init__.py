"""Built-in synthetic datasets: G-banded karyograms and blood-smear fields (the offline default).

Example:
    >>> from raycyto.synth import generate
    >>> generate("karyogram", Path("data/karyo"), patients=20, per_patient=2, seed=0)
"""

from raycyto.synth.base import SynthTask
from raycyto.synth.core import DEFAULTS, TASKS, generate, get_task

__all__ = ["DEFAULTS", "TASKS", "SynthTask", "generate", "get_task"]
