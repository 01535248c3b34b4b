"""Copying files between local folders and object stores (s3://, gs://, file://...).

Used by the sweep (trials publish fold files, the driver fetches them), ``raycyto export
--out URI`` and Serve replicas loading ``model_dir: URI``. Everything goes through
pyarrow.fs, so a ``file://`` URI in the tests runs the same code as ``s3://`` on a cluster.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from raycyto.data.decode import is_uri


def filesystem(path: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a local path or a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), str(path))


def path_exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def copy_tree(src: str, dst: str) -> None:
    """Copy a file or a folder (recursively, merging into what is there) from ``src`` to ``dst``."""
    import pyarrow.fs as pafs

    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    folder = src_fs.get_file_info(src_path).type == pafs.FileType.Directory
    target = dst_path if folder else dst_path.rstrip("/").rsplit("/", 1)[0]
    if target:
        dst_fs.create_dir(target, recursive=True)  # local filesystems need it to exist
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


@contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """``path`` itself when it is local; else a temporary local copy of it (same base name),
    removed on exit."""
    if not is_uri(path):
        yield Path(path)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="raycyto-") as tmp:
        local = Path(tmp) / path.rstrip("/").rsplit("/", 1)[-1]
        copy_tree(path, str(local))
        yield local
