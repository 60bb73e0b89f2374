"""One run per output folder: an exclusive lock held for the whole run.

Two runs writing into one `training.output_dir` would interleave checkpoints and replace each other's
model. The lock is `<output_root>/.<name>.lock` beside the folder (not inside it: the final save swaps
the folder for a new one), holding the owner's pid, host and start time for the error message.

The exclusion itself is the kernel's `flock`, not the pid in the file: the kernel drops the lock when
its holder dies however it dies (kill -9 included), and a reused pid can never make a dead run look
alive. A lock file found unlocked but still holding a pid is what a killed run leaves; it is taken
over with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import Config
from sdxl_ff.runtime.files import remove_leftovers_of, write_problem

log = logging.getLogger("sdxl_ff")


class OutputInUse(ConfigError):
    """Another live run holds the output folder's lock; the message names its pid and host."""


def lock_path(output_dir: str | Path) -> Path:
    """Beside the folder as the file system sees it: two spellings of one folder (a symlink) share one lock."""
    output_dir = Path(output_dir).resolve()
    return output_dir.parent / f".{output_dir.name}.lock"


def _holder(path: Path) -> dict:
    """What the lock file says about its owner ({} when empty or unreadable)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


def _acquire(path: Path, output_dir: Path) -> int:
    """An open descriptor of `path` holding its exclusive lock; OutputInUse when a live run holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"training.output_dir: cannot create the lock file {path}: {e.strerror}; choose a "
                              f"folder you can write to (run.output_root)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUse(f"training.output_dir: {output_dir} is in use by another run ({_describe(_holder(path))}"
                              f"; lock file {path}). Wait for it to finish, stop it, or choose another run.name "
                              f"(--set run.name=...)") from None
        except OSError:
            os.close(fd)
            raise
        # the previous holder unlinks the file when it is done: if that happened between our open and our
        # flock, we hold a lock on a file nobody else will open; start over on the file now at `path`
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def output_lock(output_dir: str | Path, other_outputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Hold the exclusive lock of `output_dir` within the block; released (and its file removed) on exit.

    Once held, the leftovers of saves of `output_dir` (and of `other_outputs`, e.g. a state file kept
    elsewhere) that a killed run left are removed: only the lock's holder writes them, so none is in use.
    """
    output_dir = Path(output_dir).absolute()
    if write_problem(output_dir):  # the run stops at its folder check, with the key and the reason
        yield lock_path(output_dir)
        return
    path = lock_path(output_dir)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(path, output_dir)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        stale = _holder(path)
        if stale:
            log.warning("%s: taking over the lock left by %s, which no longer holds it (killed?)", path,
                        _describe(stale))
        os.ftruncate(fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.pwrite(fd, json.dumps(me).encode(), 0)
        for output in (output_dir, *other_outputs):
            for leftover in remove_leftovers_of(output):
                log.warning("removed %s, left by an interrupted save (a run killed while saving)", leftover)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a waiting run then finds no stale holder in a fresh file
        os.close(fd)
        _remove_empty(created)  # a run stopped before writing anything leaves no folder behind


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()


def run_lock(cfg: Config, enabled: bool = True) -> contextlib.AbstractContextManager:
    """output_lock on the process that writes the outputs; a no-op elsewhere (the other ranks, --cache-only)."""
    # torchrun (under accelerate launch) sets RANK; the main process, the only one that writes outputs, is 0
    if enabled and os.environ.get("RANK", "0") == "0":
        return output_lock(cfg.training.output_dir, (cfg.training.state_path,))
    return contextlib.nullcontext()
