"""Files in, files out: the checks and writes every stage shares, apart from what the files hold.

Input-file checks with one clear reason (missing, a folder, unreadable, a symlink loop), sha256 of a
file, output-path checks made before any work, temporary folders tagged with the writer's pid
(and removal of those a killed run left), and the one atomic write every artifact goes through
(a temp file in the target's folder, renamed over the target). The artifact format itself is
crossvit/contract.py.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from crossvit.errors import CrossViTError, OutputError


# -- files in, files out ---------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_input_file(path: Path, error: type[CrossViTError]) -> None:
    """A readable regular file, or one line saying what it is instead (FIFOs would hang)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{path}: is a symlink loop (it, or a folder on its path, links back to itself)") from None
        raise error(f"{path}: cannot read it ({e.strerror or first_line(e)})") from None
    import stat

    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is not a regular file (a pipe, socket or device)")
    if st.st_size == 0:
        raise error(f"{path}: empty file")


# Temporary files and folders carry this tag and the writer's process id, so a later run can
# tell a leftover of a killed process (SIGKILL, power loss) from one still being written.
TEMP_TAG = "crossvit-tmp"
_TEMP_RE = re.compile(rf"{TEMP_TAG}-(\d+)-")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files and folders of dead crossvit processes in `folder`."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            m = _TEMP_RE.search(entry.name)
            if m is None or _pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
    return removed


def temp_dir(parent: str | Path | None = None, hint: str = "") -> Path:
    """A new temp folder (in `parent`, hidden, or in the system temp dir), after removing stale ones."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    remove_stale_temps(parent)
    prefix = f".{hint}." if hint else ""
    try:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}{TEMP_TAG}-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise OutputError(f"{parent}: cannot write there ({e.strerror or first_line(e)})") from None


@contextlib.contextmanager
def temporary_folder(parent: str | Path | None = None, hint: str = ""):
    """`temp_dir` as a context manager: the folder is removed on exit, whatever happened."""
    folder = temp_dir(parent, hint)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_writable(folder: Path, target: Path) -> None:
    """Probe that files can be created in `folder` (or, if it does not exist yet, in the nearest
    folder above it, where it will be created) without creating anything that stays."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # lstat sees it, stat does not: dangling, or a loop
            raise OutputError(f"{target}: cannot write there ({existing} is a dangling symlink or a symlink loop)")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{target}: cannot write there ({existing} is not a folder)")
    try:
        tempfile.NamedTemporaryFile(prefix=f".{TEMP_TAG}-{os.getpid()}-probe-", dir=existing).close()
    except OSError as e:
        raise OutputError(f"{target}: cannot write there ({e.strerror or first_line(e)})") from None


def check_output_path(path: str | Path, *, suffix: str | None = None, inputs: tuple = ()) -> Path:
    """Check, before any work, that the file `path` can be written: not a folder, not a device or
    pipe, not one of the command's `inputs`, a name that fits the file system with room for the
    temporary name beside it, its folder writable or creatable (a missing folder is created when
    the file is written). OS errors become one line naming the path."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise OutputError(f"output file must end in {suffix}, got {path.name}")
    try:
        if path.is_dir():
            raise OutputError(f"{path}: is a directory; give a file name")
        if path.exists() and not path.is_file():  # through symlinks: /dev/stdout, /dev/null, a FIFO
            raise OutputError(f"{path}: is not a regular file (a device, pipe or socket); give a file name")
        for source in inputs:
            if source is not None and path.exists() and Path(source).exists() and os.path.samefile(path, source):
                raise OutputError(f"{path}: is an input of this command; give another output name")
        _check_name_length(path)
        if path.is_file() and _locked(path):
            raise OutputError(f"{path}: cannot write it (it is immutable or append-only: chattr -i / -a)")
    except OSError as e:  # a symlink loop, a name too long for the file system
        raise OutputError(f"{path}: cannot write there ({e.strerror or first_line(e)})") from None
    _check_writable(path.parent, path)
    return path


_FS_IOC_GETFLAGS = 0x80086601  # Linux: a file's attribute flags (lsattr)
_LOCKED_FLAGS = 0x10 | 0x20  # FS_IMMUTABLE_FL, FS_APPEND_FL: not replaced by a rename over it


def _locked(path: Path) -> bool:
    """An existing file the final rename cannot replace (Linux's immutable or append-only attribute);
    False where the flags cannot be read (another OS or file system)."""
    try:
        import array
        import fcntl

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (ImportError, OSError):
        return False
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        return bool(flags[0] & _LOCKED_FLAGS)
    except OSError:
        return False
    finally:
        os.close(fd)


def check_output_dir(path: str | Path) -> Path:
    """Check, before any work, that outputs can be written into the folder `path`."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path}: exists and is not a folder")
        _check_name_length(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write there ({e.strerror or first_line(e)})") from None
    _check_writable(path, path)
    return path


def _check_name_length(path: Path) -> None:
    """Every part of `path` must fit the file system's name limit, the last with room for the
    temporary name written beside it (`.NAME.crossvit-tmp-PID-xxxxxxxx`)."""
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    room = len(f"..{TEMP_TAG}-{os.getpid()}-00000000")
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise OutputError(f"{path}: a name in it is {len(os.fsencode(part))} bytes; this file system allows "
                              f"{limit}")
    if len(os.fsencode(path.name)) + room > limit:
        raise OutputError(f"{path}: its name is {len(os.fsencode(path.name))} bytes; at most {limit - room} fit "
                          f"here (with room for the temporary file written beside it)")


FILE_MODE = 0o644  # every artifact; mkstemp alone would give 0600


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temp path beside `path`, then rename it over `path` (mode 0644).

    A failure (an exception, a full disk, Ctrl-C or SIGTERM) removes the temp file and leaves
    any previous `path` untouched; a SIGKILLed writer's leftover is removed by the next write
    into that folder (`remove_stale_temps`).
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot write there ({e.strerror or first_line(e)})") from None
    remove_stale_temps(folder)
    tmp = folder / f".{path.name}.{TEMP_TAG}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({e.strerror or first_line(e)})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path
