"""raycyto: transfer-learning classifiers for karyograms and leukemia smears on Ray."""

__version__ = "0.1.0"
