"""raycyto.export: the configuration the report calls best, written as a verified, servable bundle
(:func:`raycyto.export.core.export_model`; ``raycyto export`` in :mod:`raycyto.export.cli`)."""
