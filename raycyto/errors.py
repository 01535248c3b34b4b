"""Errors a user can cause. Each message names the field, file or value and what to do."""


class RaycytoError(Exception):
    """Base class for every error raycyto raises on purpose."""


class ConfigError(RaycytoError):
    """A config field is unknown or invalid; ``field`` is its dotted name (``search.lr``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class DataError(RaycytoError):
    """A data source or image could not be used."""


class WeightsError(RaycytoError):
    """Pretrained or exported weights are missing, unreadable or fail their checksum."""
