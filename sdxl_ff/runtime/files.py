"""Crash-safe writing: files and folders appear under their final name only when complete.

A file is written to a temporary name in the same folder, flushed, fsynced and renamed over
the old one; a folder is written beside the old one and swapped in, so a crash, Ctrl-C or a
full disk at any moment leaves either the old or the new version, never a half-written one.
"""

from __future__ import annotations

import errno
import functools
import glob
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask; read from /proc where it can be, since os.umask can only read it by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_modes(folder: str | Path) -> None:
    """Give `folder` and everything below it the modes a plain open()/mkdir() would under the umask.

    The libraries that write model files may create them 0600 (a temporary file renamed into place),
    and then another account (a web UI, a shared ComfyUI) cannot read the model although umask 022 allows it.
    """
    mask = current_umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomic(path: str | Path, write: Callable[[Path], None], shared: bool = False) -> None:
    """Call write(tmp_path), then fsync and rename tmp_path to `path`; remove tmp on failure.

    `shared`: the folder is shared by runs that may write at the same time (a cache), so no run can hold a
    lock on it; the temporary name then carries its writer (`.<name>.<writer_tag()>.<random>.tmp`), so
    remove_dead_writers_leftovers can later tell a killed writer's file from one still being written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{writer_tag()}." if shared else f".{path.name}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: give what a plain open() would
        os.replace(tmp, path)
    except BaseException as e:
        if full := _failed_write(e, path.parent, lambda: tmp.unlink(missing_ok=True)):
            raise full from e
        raise
    _fsync_dir(path.parent)


def disk_full(error: BaseException, folder: str | Path) -> bool:
    """Did this write fail for lack of space? torch and safetensors report a full disk in their own words."""
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def _failed_write(error: BaseException, folder: Path, cleanup: Callable[[], None]) -> BaseException | None:
    """Clean up after a failed write; an error to raise instead when the disk was full before cleanup freed it."""
    full = isinstance(error, Exception) and disk_full(error, folder)  # judged while the partial write fills it
    cleanup()
    if full and not (isinstance(error, OSError) and error.errno == errno.ENOSPC):
        return OSError(errno.ENOSPC, f"No space left on device in {folder} ({type(error).__name__}: {error})")
    return None


def describe_write_error(error: BaseException, folder: str | Path) -> str:
    """A user-facing reason for a failed write."""
    return "the disk is full" if disk_full(error, folder) else f"{type(error).__name__}: {error}"


def write_problem(folder: str | Path) -> str | None:
    """Why files cannot be written into `folder` (created if missing), or None; leaves nothing behind.

    Another run may be probing or filling the same folders at the same moment (two runs sharing a cache):
    a folder it created first is not an error, a folder this probe created but the other run has since
    written into is left in place (only empty folders this probe made are removed), and a folder the other
    run's probe removed under this one (its own clean-up) means trying again, not failing.
    """
    for _ in range(10):
        try:
            return _probe_once(Path(folder).absolute())
        except FileNotFoundError:  # a folder vanished between our mkdir and our write: another run's probe
            continue
    return f"{folder} keeps disappearing while it is being created (another program removes it)"


def _probe_once(folder: Path) -> str | None:
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    created = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
                created.append(path)
            except FileExistsError:
                if not path.is_dir():
                    return f"{path} is a file, not a folder"
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileNotFoundError:
        raise
    except OSError as e:
        return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    finally:
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError as e:  # another run has put files (or folders) into it meanwhile: it is theirs now
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
    return None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    import torch  # here: the rest of this module serves torch-free start-up code (image index, dataset.py)

    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def fsync_tree(folder: Path) -> None:
    """Flush every file below `folder` to disk (before a rename makes them visible)."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_interrupted_swap(path: str | Path) -> None:
    """If a crash hit between the two renames of replace_dir_atomic, put the old folder back."""
    path = Path(path)
    old = _old_name(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)


# Hard-linking fails across filesystems (a symlink or mount inside the folder: EXDEV) and on filesystems without
# hard links (EPERM, ENOTSUP, EMLINK); copying works there
LINK_FAILURES = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EACCES})


def link_or_copy(src: str | Path, dst: str | Path) -> str:
    """Hard-link `src` as `dst` (no bytes written); copy it where linking is impossible. Returns `dst`."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as e:
        if e.errno not in LINK_FAILURES:
            raise
        shutil.copy2(src, dst, follow_symlinks=False)
    return str(dst)


def carry_entry(entry: Path, target: Path) -> None:
    """Put `entry` (of the folder being replaced) into the new folder as `target`: a symlink as the same symlink
    (its target, maybe on another filesystem, is not copied), files and folders as hard links or copies."""
    if entry.is_symlink():
        os.symlink(os.readlink(entry), target)
    elif entry.is_dir():  # not shutil.copytree: it goes on after a failure and reports it without its errno
        target.mkdir()
        for child in entry.iterdir():
            carry_entry(child, target / child.name)
        shutil.copystat(entry, target)
    else:
        link_or_copy(entry, target)


def link_problem(folder: Path) -> str | None:
    """Why files in `folder` cannot be hard-linked to new names there (then they are copied), or None."""
    fd, name = tempfile.mkstemp(prefix=".link-probe.", dir=folder)
    os.close(fd)
    try:
        os.link(name, f"{name}.link")
        os.unlink(f"{name}.link")
    except OSError as e:
        return error_cause(e)
    finally:
        os.unlink(name)
    return None


class FolderKept(OSError):
    """The new folder was complete but could not replace the old one; it was kept, complete, as `kept`.

    `cause` is the error that stopped the swap (its errno is this error's errno)."""

    def __init__(self, kept: Path, cause: BaseException):
        super().__init__(cause.errno if isinstance(cause, OSError) and cause.errno else errno.EIO,
                         f"kept the new folder as {kept}: {error_cause(cause)}")
        self.kept, self.cause = kept, cause

    def __str__(self) -> str:
        return self.strerror


def error_cause(error: BaseException) -> str:
    """The real cause of a failed write, errno included: `No space left on device (errno 28 ENOSPC: /x/y)`."""
    if isinstance(error, OSError) and error.errno:
        names = " -> ".join(str(f) for f in (error.filename, error.filename2) if f)
        return (f"{error.strerror or error} (errno {error.errno} {errno.errorcode.get(error.errno, '?')}"
                f"{': ' + names if names else ''})")
    cause = error.__cause__ or error.__context__
    if isinstance(cause, OSError) and cause.errno:
        return error_cause(cause)
    return f"{type(error).__name__}: {error}"


def unused_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : the first that does not exist."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


@contextmanager
def replace_dir_atomic(path: str | Path, keep_as: Path | None = None) -> Iterator[Path]:
    """Yield a fresh sibling folder to fill; on success it replaces `path`, on failure it is removed.

    Entries already in `path` that the new folder does not contain (e.g. checkpoints/) are carried
    over as hard links (copies where linking fails; symlinks as symlinks), so swapping in new weights never
    drops what lies beside them and usually costs no copy.
    `keep_as`: when the new folder is complete but carrying the old entries over or the swap fails, keep it
    under this name (or the next unused one) and raise FolderKept, instead of removing it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: give what a plain mkdir would
        yield tmp
    except BaseException as e:
        if full := _failed_write(e, path.parent, lambda: shutil.rmtree(tmp, ignore_errors=True)):
            raise full from e
        raise
    carried = []
    try:
        for entry in (path.iterdir() if path.is_dir() else ()):
            target = tmp / entry.name
            if not os.path.lexists(target):
                carried.append(target)
                carry_entry(entry, target)
        fsync_tree(tmp)
        old = _old_name(path)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)  # a crash between these two renames is undone by recover_interrupted_swap
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        recover_interrupted_swap(path)
        if keep_as is None or not isinstance(e, Exception):
            if full := _failed_write(e, path.parent, lambda: shutil.rmtree(tmp, ignore_errors=True)):
                raise full from e
            raise
        full = disk_full(e, path.parent)
        for target in carried:  # what was carried is still in `path`; the kept folder holds only the new files
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                target.unlink()
        kept = unused_name(keep_as)
        os.replace(tmp, kept)
        cause = e if not full or (isinstance(e, OSError) and e.errno == errno.ENOSPC) else \
            OSError(errno.ENOSPC, f"No space left on device in {path.parent} ({type(e).__name__}: {e})")
        raise FolderKept(kept, cause) from e


def remove_leftovers_of(path: str | Path) -> list[Path]:
    """Delete what interrupted atomic writes of `path` left beside it (gigabytes for a model folder); return them.

    Those are the temporary names write_atomic and replace_dir_atomic give (`.<name>.<8 random>.tmp`, matched
    exactly, so another output's `.<name>.x.<random>.tmp` is never taken), and `.<name>.old` once `path` is back.
    Call it only while no other process may be writing `path` (under the output folder's lock).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    recover_interrupted_swap(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # tempfile's random names
    removed = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    if _old_name(path).exists() and path.exists():  # a swap that completed up to removing the old folder
        removed.append(_old_name(path))
    for leftover in removed:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return removed


_SHARED_TMP = re.compile(r"\..+\.([0-9a-f]{8})-(\d+)\.[a-z0-9_]{8}\.tmp")


@functools.cache
def _machine() -> str:
    """A hash of the host name and the pid namespace (containers sharing a host name and a folder have their own
    pids); computed once, not for every cache entry written."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{zlib.crc32(f'{socket.gethostname()}|{namespace}'.encode()):08x}"


def writer_tag() -> str:
    """This process, as a shared folder's temporary names carry it: `<machine>-<pid>`."""
    return f"{_machine()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def remove_dead_writers_leftovers(folder: str | Path, of: str | None = None) -> list[Path]:
    """Delete the temporary files (write_atomic(shared=True)) in `folder` and its subfolders whose writer was a
    process on this machine that no longer runs (killed while writing a cache entry); return them.
    `of`: only those of the file of this name, in `folder` itself (not its subfolders).

    Files still being written by a live run, and files written from another machine (a shared network
    folder: its processes cannot be checked from here), are left alone.
    """
    removed = []
    folder = Path(folder)
    candidates = folder.glob(f".{glob.escape(of)}.*.tmp") if of else folder.rglob(".*.tmp")
    for candidate in candidates if folder.is_dir() else ():
        match = _SHARED_TMP.fullmatch(candidate.name)
        if match and match[1] == _machine() and not _alive(int(match[2])):
            try:
                candidate.unlink(missing_ok=True)
            except OSError:  # a read-only folder (a shared cache) keeps it; nothing is written there either
                continue
            removed.append(candidate)
    return removed


