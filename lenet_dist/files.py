"""Writing files so that a reader never sees half of one, and a failed write is one line naming the file.

Everything lenet-dist writes goes through `write_atomically`: into `<name>.partial`, then renamed over the
target, so that a crash, a kill or a full disk leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import resource
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lenet_dist.errors import UsageError, UserError


def write_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(partial_path)`, then rename the partial file onto `path`, readable as the umask allows."""
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        follow_umask(partial)
        partial.replace(path)
    except Exception as error:
        with contextlib.suppress(OSError):
            partial.unlink()
        if is_write_failure(error):
            raise UserError(write_failure(path, error)) from None
        raise
    return path


def require_writable(path: Path, flag: str) -> None:
    """Refuse now, in one line, a file a long job would fail to write at its end: no folder for it, a read-only one,
    or a folder in its place."""
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: there is no folder {folder}; create it or choose another path")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; name a file in it")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: {folder} is not writable; choose another path")


def follow_umask(path: Path) -> None:
    """Give a written file the mode the umask gives new files (0644 under 022): safetensors writes its files 0600,
    which a colleague's `predict` from a shared run folder could not read."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for a moment, for every thread)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # no /proc (macOS): the only other way to read it
    os.umask(mask)
    return mask


def write_json(path: Path, payload: Any) -> Path:
    return write_atomically(path, lambda partial: partial.write_text(json.dumps(payload, indent=2) + "\n"))


# How the libraries that write files report a failed write: torch.save's zip writer raises RuntimeError
# ("PytorchStreamWriter failed writing file …", "[enforce fail at inline_container.cc] … unexpected pos"),
# safetensors its SafetensorError (an I/O error inside).
WRITE_FAILURE_WORDS = ("PytorchStreamWriter", "inline_container", "unexpected pos", "failed writing", "Errno")


def is_write_failure(error: Exception) -> bool:
    """OSError, or a library's wrapper of one; any other RuntimeError (out of memory, a bug) is not."""
    if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in WRITE_FAILURE_WORDS)


def write_failure(path: Path, error: Exception) -> str:
    """`could not write PATH: <the OS error>`, finding the OS error when a library hid it."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else _likely_cause(path)
    return f"could not write {path}: {reason or str(error).splitlines()[0]}; free space, or choose another folder"


def _likely_cause(path: Path) -> str | None:
    """torch.save says `unexpected pos 704 vs 598` where the OS said EFBIG or ENOSPC: name the likely one."""
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY:
        return f"{os.strerror(errno.EFBIG)} (the file size limit is {limit:,} bytes)"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < 1 << 20:
            return os.strerror(errno.ENOSPC)
    return None


def fsync_folder(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (unless `files` is False), then its entries, to the disk: renames survive a lost host."""
    for path in sorted(folder.iterdir()) if files else []:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_maybe_gzipped(path: Path) -> bytes:
    """The bytes of `path`, decompressed when its name ends in .gz; a truncated or corrupt one is a UserError."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise UserError(f"{path} is not a whole gzip file ({error}); delete it and download it again "
                        "(lenet-dist download)") from None
