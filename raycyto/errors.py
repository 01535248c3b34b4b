"""Errors a user can cause. Each message names the field, file or value and what to do."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from typing import Iterator


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


def error_line(exc: BaseException) -> str | None:
    """The message of the :class:`RaycytoError` behind ``exc`` on one line, or None if there is none.

    ``exc`` itself, or what Ray made of one raised in a task or actor: a ``RayTaskError`` (its
    ``cause``; its own text is the worker's traceback), one in the ``__cause__`` /
    ``__context__`` chain, or an ``ActorDiedError`` of a failed actor ``__init__`` (a Ray Data
    actor pool's, say), which keeps the error only as text: the last ``raycyto.errors.X: ...``
    line of its traceback.
    """
    ray_exc = sys.modules.get("ray.exceptions")  # no Ray imported: no Ray error to unwrap
    task_error = ray_exc.RayTaskError if ray_exc else ()
    ray_error = ray_exc.RayError if ray_exc else ()
    todo, seen, texts = [exc], set(), []
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, task_error):
            todo.append(e.cause)  # RayTaskError(DataError) is a DataError too, but its text is a traceback
            texts.append(str(e))
        elif isinstance(e, RaycytoError):
            return " ".join(str(e).split())
        elif isinstance(e, ray_error):
            texts.append(str(e))
        todo += [e.__cause__, e.__context__]
    for text in texts:
        named = list(re.finditer(r"^raycyto\.errors\.(\w+): ", text, flags=re.M))
        cls = getattr(sys.modules[__name__], named[-1].group(1), None) if named else None
        if isinstance(cls, type) and issubclass(cls, RaycytoError):
            return " ".join(text[named[-1].end():].split())
    return None


class _DropRayTraces(logging.Filter):
    """Logging filter: drops a record about an exception (its own, or the one being handled where
    it is logged) that :func:`error_line` maps to a RaycytoError -- Ray Data logs an actor's
    failed ``__init__`` as a Ray bug with the full traceback, then raises it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or error_line(exc) is None


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For a command: a RaycytoError, raised here or in a Ray task or actor, becomes
    ``error: <one line>`` on stderr and exit code 2, with no traceback (Ray Data's console
    report of it is dropped too). Any other exception propagates unchanged."""
    ray_data = logging.getLogger("ray.data.exceptions")
    drop = _DropRayTraces()
    ray_data.addFilter(drop)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - anything else is re-raised as it was
        line = error_line(exc)
        if line is None:
            raise
        import typer

        typer.secho("error:", fg="red", err=True, nl=False)
        typer.echo(f" {line}", err=True)
        raise typer.Exit(2) from None
    finally:
        ray_data.removeFilter(drop)
