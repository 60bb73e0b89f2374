"""The image size index: each image's displayed size (and whether it has an alpha channel), kept in one small
JSON file keyed by path, file size and modification time, so a second start-up reads no image header.

An entry is used only while the file's size and mtime (nanoseconds) are what they were when it was read; any
change and the image is opened and checked again. The file is rewritten atomically when something changed;
entries of folders this run did not scan are kept, so runs over different folders can share one index.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .state import write_atomic

log = logging.getLogger(__name__)

FORMAT = "sdxl-ff-image-index-1"


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    alpha: bool


def list_files(root: Path, suffixes: set[str]) -> list[str]:
    """Files below `root` with one of `suffixes` (any case), as paths relative to it, in the order pathlib sorts
    them (part by part: a depth-first walk with each folder's entries sorted by name). os.scandir, not
    Path.rglob + sorted(): on 100,000 files pathlib's objects cost seconds."""
    found: list[str] = []

    def walk(relative: str) -> None:
        with os.scandir(root / relative) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            name = os.path.join(relative, entry.name) if relative else entry.name
            if entry.is_dir(follow_symlinks=False):  # as rglob: linked folders are not entered
                walk(name)
            elif os.path.splitext(entry.name)[1].lower() in suffixes and entry.is_file():
                found.append(name)

    walk("")
    return found


def stat_key(path: str | Path) -> tuple[int, int]:
    """(size in bytes, mtime in ns): what must be unchanged for an entry to be used."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class ImageIndex:
    """Path -> (size, mtime_ns, width, height, alpha), loaded from and saved to `path` ("" keeps it in memory)."""

    def __init__(self, path: str | Path = ""):
        self.path = Path(path) if path else None
        self.entries: dict[str, list] = {}
        self.changed = False
        self.hits = self.misses = 0
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") == FORMAT:  # an edited entry that is not 5 integers is read from its file
                    self.entries = {p: e for p, e in data["images"].items()
                                    if isinstance(e, list) and len(e) == 5 and all(type(v) is int for v in e)}
            except (OSError, ValueError, KeyError, AttributeError) as e:  # unreadable: start afresh, rewrite it
                log.warning("image index %s cannot be read (%s); re-reading the image headers", self.path, e)
                self.changed = True

    def get(self, path: Path, key: tuple[int, int]) -> ImageInfo | None:
        entry = self.entries.get(str(path))
        if entry is not None and (entry[0], entry[1]) == key:
            self.hits += 1
            return ImageInfo(entry[2], entry[3], bool(entry[4]))
        self.misses += 1
        return None

    def put(self, path: Path, key: tuple[int, int], info: ImageInfo) -> None:
        self.entries[str(path)] = [key[0], key[1], info.width, info.height, int(info.alpha)]
        self.changed = True

    def forget_missing(self, root: str, present: set[str]) -> None:
        """Drop entries below `root` (absolute) whose file this scan did not find (deleted or renamed images)."""
        prefix = root.rstrip(os.sep) + os.sep
        gone = [p for p in self.entries if p.startswith(prefix) and p not in present]
        for p in gone:
            del self.entries[p]
        self.changed |= bool(gone)

    def save(self) -> None:
        """Write the index atomically if anything changed; a read-only or full disk only costs the next start-up."""
        if self.path is None or not self.changed:
            return
        text = json.dumps({"format": FORMAT, "images": self.entries}, separators=(",", ":"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            self.changed = False
        except OSError as e:
            log.warning("image index %s could not be written (%s); the next start-up reads the headers again",
                        self.path, e)
