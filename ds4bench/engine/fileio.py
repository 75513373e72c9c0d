"""Writes that fail cleanly: a temporary beside the target renamed into place, one-line errors that
name the file and say when the disk is full, and a free-space check before a large write; and the
host memory available before a large allocation. The lowest layer of the package: it imports
nothing of ds4bench."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


def write_error(path, e: OSError) -> OSError:
    """A one-line OSError naming the file, that says so when the disk is full."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or _disk_full(path):
        why = "no space left on the device"
    else:
        why = (e.strerror or str(e)).lower()
    out = OSError(f"cannot write {path}: {why}")
    out.errno = e.errno
    return out


def _disk_full(path, slack: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(Path(path).parent if not Path(path).is_dir() else path).free < slack
    except OSError:
        return False


def disk_note(path) -> str:
    """'; the disk holding PATH is full' when it is, else ''."""
    return f"; the disk holding {path} is full" if _disk_full(path) else ""


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary name beside `path`; rename it into place on success, delete it on any
    failure (an OSError becomes write_error's one line)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def check_free_space(path, need: int) -> None:
    """OSError before a large write that the disk cannot hold."""
    where = Path(path).resolve().parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if need > free:
        raise OSError(f"cannot write {path}: it needs {need:,} bytes and {where} has {free:,} free")


def host_available() -> int:
    """MemAvailable in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
