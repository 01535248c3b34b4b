"""Placeholder: the owner of raycyto/serve replaces this module."""


def export() -> None:
    """Not built yet."""
    raise SystemExit(1)


def serve() -> None:
    """Not built yet."""
    raise SystemExit(1)


def predict() -> None:
    """Not built yet."""
    raise SystemExit(1)
