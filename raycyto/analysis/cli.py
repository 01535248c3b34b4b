"""Placeholder: the owner of raycyto/analysis replaces this module."""


def report() -> None:
    """Not built yet."""
    raise SystemExit(1)
