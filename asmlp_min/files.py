"""Files written whole or not at all: a temporary file in the same folder, flushed, then renamed over the target.

A failed write (a full disk, Ctrl-C, a read-only folder) leaves the target as it was and no temporary file behind;
the error says which file, why, and that nothing was damaged.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a file to write ``path`` all or nothing: ``with atomic_write(path) as f: f.write(data)``.

    The data goes to a uniquely named temp file in the same folder (created if needed), which is flushed to disk
    and renamed over ``path`` when the block ends; on any error, Ctrl-C included, the temp file is removed and
    ``path`` is left as it was. The file gets the usual permissions (0o666 minus the umask), not mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as err:  # a folder where no file can be created (read-only, /proc)
        raise not_written(err, path) from None
    try:
        with os.fdopen(fd, mode) as f:
            if hasattr(os, "fchmod"):  # Windows has it from Python 3.13 on, and no POSIX permissions to set
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):  # about this file
            raise not_written(err, path, started=err.filename is None) from None  # tmp: os.replace failed
        raise


REPLACE_TRIES, WINDOWS = 5, os.name == "nt"


def _replace(tmp: str, path: Path) -> None:
    """``os.replace``; on Windows tried again for about a second while it is refused: there a file that another
    program holds open (metrics.jsonl in a spreadsheet, a virus scanner, a sync client) cannot be replaced."""
    for attempt in range(REPLACE_TRIES):
        try:
            return os.replace(tmp, path)
        except PermissionError:
            if not WINDOWS or attempt == REPLACE_TRIES - 1:
                raise
            time.sleep(0.25)


def _temp_prefix(name: str) -> str:
    """``.<name>.``, the name cut (at a whole character) so that the temp file's name, 14 bytes longer with
    mkstemp's 8 characters and ".tmp", stays within the usual 255-byte limit where ``name`` itself fits."""
    return "." + name.encode()[:255 - 14].decode(errors="ignore") + "."


def not_written(err: OSError, path: Path, started: bool = False) -> OSError:
    """``err`` told about ``path`` rather than the temp file standing in for it (which is gone): a :class:`WriteError`
    for lack of room or for a write that failed once started (an I/O error, a disk remounted read-only), else the
    same kind of OSError (IsADirectoryError, PermissionError, ...) naming ``path``."""
    if err.errno in NO_ROOM or started:
        reason, advice = ((NO_ROOM[err.errno], "free some space or write elsewhere") if err.errno in NO_ROOM
                          else (err.strerror or str(err), "check the disk, or write elsewhere"))
        return WriteError(err.errno, f"{path} was not written: {reason}. Any earlier {path.name} is unchanged, no "
                          f"temp file is left; {advice}", str(path))
    return type(err)(err.errno, err.strerror, str(path))


def shell_word(path: str | os.PathLike) -> str:
    """``path`` as one word of a command a user pastes into a shell: quoted where it holds spaces or other
    characters the shell would split or expand (``--resume 'my runs/checkpoint.pt'``)."""
    return subprocess.list2cmdline([str(path)]) if WINDOWS else shlex.quote(str(path))


class WriteError(OSError):
    """A file could not be written for lack of room (disk full, quota, file-size limit); ``str()`` says which file,
    why, that nothing was damaged, and what to do."""

    def __str__(self) -> str:
        return self.strerror


NO_ROOM = {errno.ENOSPC: "the disk is full (no space left on device)",
            errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file would be larger than allowed (a file-size limit such as 'ulimit -f', or the "
                         "filesystem's largest file)"}
_TEMP_NAME = r"\.{name}\.[A-Za-z0-9_]{{8}}\.tmp"  # what atomic_write's mkstemp creates


def remove_stale_temp_files(folder: str | os.PathLike, names: list[str]) -> list[Path]:
    """Delete the temp files that :func:`atomic_write` left in ``folder`` for files called ``names`` when its process
    was killed (SIGKILL, power loss) before it could clean up; returns what was removed. Only call it where no other
    process is writing those files (a run folder that this run owns)."""
    pattern = re.compile("|".join(_TEMP_NAME.format(name=re.escape(name)) for name in names))
    stale = [p for p in Path(folder).iterdir() if pattern.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask
