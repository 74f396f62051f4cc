"""Atomic outputs: every file or directory is written under a temporary name and renamed when
complete, so an interrupted job never leaves an output that looks finished."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bd.errors import BDError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BDError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK):
        raise BDError(f"output folder {folder} is not writable")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or directory to; rename it onto ``path`` on
    success, remove it on failure. An existing ``path`` is replaced only once the new one is whole."""
    final = Path(path)
    _check_writable(final.parent)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise BDError(f"could not write {final}: {exc.strerror or exc}") from exc
    except BDError:
        _remove(tmp)
        raise
    except Exception as exc:
        full = _disk_full(final.parent)  # before the partial output is removed and frees space
        _remove(tmp)
        if full:  # some writers (torch.save) report a full disk as a generic RuntimeError
            raise BDError(f"could not write {final}: no space left on device ({exc})") from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system of ``folder`` has less than ``margin`` bytes left for users."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < margin


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in blocks (weights files are large): the identity of inputs that
    checkpoints and stores record."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
