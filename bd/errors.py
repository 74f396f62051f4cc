"""Error types that the command line turns into one clear message (no traceback).

Two kinds of failure must never be confused: a fault of the slide itself (unreadable, corrupt,
unsupported: :class:`SlideError`, which ``on_slide_error: skip`` may record and pass over) and a
fault of the machine (out of memory, a full disk, an I/O or permission error:
:class:`ResourceError`, which always fails the job, so that a retry with more memory, or the
user, can act). :func:`slide_fault` sorts a low-level exception into one or the other.
"""

from __future__ import annotations

import errno


class BDError(Exception):
    """Base class: an error a user can act on; its message names the file, row or key at fault."""


class ConfigError(BDError):
    """A configuration or parameter value is unknown, of the wrong type or out of range."""


class SlideError(BDError):
    """A slide file cannot be opened or read; the message names the file and the reason."""


class ResourceError(BDError):
    """The machine, not the input, failed (memory, disk, I/O, permissions); never skipped."""


class TableError(BDError):
    """A clinical table, sample sheet or split file is malformed; names the file, row and column."""


class StoreError(BDError):
    """A feature store or other stage output is missing, incomplete or inconsistent."""


# errno values that say the machine failed, with what the user (or a retry) can do about it.
ENVIRONMENT_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on device: free space or point TMPDIR/results elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space or raise the quota",
    errno.ENOMEM: "out of memory: give the job more memory",
    errno.EMFILE: "too many open files in this process: raise `ulimit -n`",
    errno.ENFILE: "too many open files on the system",
    errno.EIO: "input/output error from the storage: check the disk or network file system",
    errno.EACCES: "permission denied: make the file readable",
    errno.EPERM: "operation not permitted",
    errno.ESTALE: "stale network file handle: retry",
    errno.ETIMEDOUT: "timed out reading the storage: retry",
}
# Substrings of decoder messages (OpenCV, libvips, OpenSlide) that mean an allocation failed.
OUT_OF_MEMORY_TEXT = ("insufficient memory", "failed to allocate", "out of memory", "cannot allocate memory",
                      "std::bad_alloc")


# Messages of libraries that report a full disk as text (libvips, libtiff), not as an errno.
DISK_TEXT = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT}


def environment_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is the machine's fault (memory, disk, I/O), or None when it may be the slide's."""
    if isinstance(exc, MemoryError):
        return "out of memory: give the job more memory"
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        return ENVIRONMENT_ERRNOS[exc.errno]
    text = str(exc).lower()
    if any(t in text for t in OUT_OF_MEMORY_TEXT):
        return "out of memory: give the job more memory"
    return next((ENVIRONMENT_ERRNOS[code] for t, code in DISK_TEXT.items() if t in text), None)


def slide_fault(message: str, exc: BaseException) -> BDError:
    """A :class:`ResourceError` when ``exc`` is an environment failure, else a :class:`SlideError`;
    either way ``message`` (naming the file) and the original reason."""
    reason = environment_reason(exc)
    if reason is not None:
        return ResourceError(f"{message}: {exc} ({reason}); this is not a fault of the slide")
    return SlideError(f"{message}: {exc}")
