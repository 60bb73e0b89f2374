"""The image size index: each image's displayed size (and whether it has an alpha channel), kept in one small
JSON file keyed by path, file size and modification time, so a second start-up reads no image header.

An entry is used only while the file's size and mtime (nanoseconds) are what they were when it was read; any
change and the image is opened and checked again. The file is not trusted blindly: an entry that is not five
integers in range is dropped with one warning when the index is read, and one whose size disagrees with its
image's header (an edited or mixed-up index) is dropped when the image is opened (`drop_entry`). The file is
rewritten atomically when something changed; entries of folders this run did not scan are kept, so runs over
different folders can share one index.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sdxl_ff.runtime.files import write_atomic

log = logging.getLogger(__name__)

FORMAT = "sdxl-ff-image-index-1"


MAX_SIDE = 2**31 - 1  # PNG's limit on a side, the largest of the formats read (JPEG 65,535, WebP 16,383)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    alpha: bool


@dataclass(frozen=True)
class IndexedSize:
    """Where an image's size came from when it was taken from the index unchecked: the index file, the image's key
    there and its (size, mtime_ns) then; the dataset checks the size when it opens the image."""
    index_file: str
    key: str
    stat: tuple[int, int]


def entry_problem(entry: object) -> str | None:
    """Why an index entry cannot be used, or None: [size, mtime_ns, width, height, alpha], all integers."""
    if not isinstance(entry, list) or len(entry) != 5 or not all(type(v) is int for v in entry):
        return f"{json.dumps(entry)[:60]} is not 5 integers [file size, mtime_ns, width, height, alpha]"
    size, _, width, height, alpha = entry
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        return f"width x height {width}x{height} is not 1 to {MAX_SIDE} pixels a side"
    if size < 0 or alpha not in (0, 1):
        return f"file size {size} is negative" if size < 0 else f"alpha {alpha} is not 0 or 1"
    return None


def list_files(root: Path, suffixes: set[str]) -> list[str]:
    """Files below `root` with one of `suffixes` (any case), as paths relative to it, in the order pathlib sorts
    them (part by part: a depth-first walk with each folder's entries sorted by name). os.scandir, not
    Path.rglob + sorted(): on 100,000 files pathlib's objects cost seconds.

    Linked folders are entered: a link put into a data folder (a data set assembled from shared collections) is
    put there to be read; sd-scripts' recursive scan (pathlib's rglob) skips them without a word. A folder already
    read (a link back up the tree, a loop, or two links to one folder) is not read again, and a link to an image
    that no longer exists is skipped: each with one warning naming how many and one of them.
    """
    found: list[str] = []
    dangling: list[str] = []
    repeated: list[str] = []
    walked = {os.path.realpath(root)}

    def walk(relative: str) -> None:
        with os.scandir(root / relative) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            name = os.path.join(relative, entry.name) if relative else entry.name
            if entry.is_dir():  # a link to a folder included
                if (real := os.path.realpath(entry.path)) in walked:
                    repeated.append(f"{root / name} (leads to {real})")
                else:
                    walked.add(real)
                    walk(name)
            elif os.path.splitext(entry.name)[1].lower() in suffixes:
                if entry.is_file():
                    found.append(name)
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    dangling.append(str(root / name))

    walk("")
    if dangling:
        log.warning("%s: %d image link(s) lead to no file (the file they name is gone), e.g. %s; skipped", root,
                    len(dangling), dangling[0])
    if repeated:
        log.warning("%s: %d linked folder(s) lead to a folder already read, e.g. %s; not read again (each image is "
                    "trained once)", root, len(repeated), repeated[0])
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
        self.wrong: list[str] = []  # entries whose size disagreed with their image's header (corrected)
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") == FORMAT:
                    self.entries = self._valid(data["images"])
            except (OSError, ValueError, KeyError, AttributeError) as e:  # unreadable: start afresh, rewrite it
                log.warning("image index %s cannot be read (%s); re-reading the image headers", self.path, e)
                self.changed = True

    def _valid(self, images: dict) -> dict[str, list]:
        """The usable entries of `images`; the others are dropped with one warning (their images are read again)."""
        problems = {p: problem for p, e in images.items() if (problem := entry_problem(e))}
        if problems:
            path, problem = next(iter(problems.items()))
            log.warning("image index %s: %d entr%s not valid, e.g. %s: %s; dropped, those images are read again",
                        self.path, len(problems), "y is" if len(problems) == 1 else "ies are", path, problem)
            self.changed = True
        return {p: e for p, e in images.items() if p not in problems}

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

    def indexed(self, path: Path, key: tuple[int, int]) -> IndexedSize:
        """What a record taken from this index needs to have its size checked later (IndexedSize)."""
        return IndexedSize(str(self.path) if self.path is not None else "", str(path), key)

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


def drop_entry(indexed: IndexedSize) -> None:
    """Remove the entry of `indexed` from its index file (its size was wrong): the next start-up reads the image.

    A read, edit and atomic rewrite without a lock: two processes dropping entries at once may keep one of them,
    which the next start-up then finds and drops again (it never stops a run).
    """
    if not indexed.index_file:
        return
    index = ImageIndex(indexed.index_file)
    if index.entries.pop(indexed.key, None) is not None:
        index.changed = True
        index.save()
