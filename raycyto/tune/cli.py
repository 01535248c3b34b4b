"""Placeholder: the owner of raycyto/tune replaces this module."""


def sweep() -> None:
    """Not built yet."""
    raise SystemExit(1)
