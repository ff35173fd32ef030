"""Checksummed caches keyed by content: a cached result is reused only if it was computed
from the same bytes and every file is as it was written.

A cache folder (calib/<id>/, calib/fp32-reference/<key>/) holds files written one by one;
a kill between two writes, a full disk or a hand edit can leave one damaged or missing.
`seal` records the SHA-256 of each file in checksums.json, written last; `check_seal` says
whether the cache can be reused, and why not, so the caller recomputes instead of failing.

A cache's key names what it was computed from by content, not by file names or
modification times (a folder whose images were replaced under the same names, or copied
with `cp -p` / `rsync -t`, must not hit): `dataset_digest` hashes the bytes of every file
the first samples of a landmark data set read.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from cunet_optimize.atomic import sha256_file, write_atomic

SEAL_FILE = "checksums.json"


def seal(folder: str | os.PathLike, files: Iterable[str | os.PathLike]) -> Path:
    """Record the checksums of `files` (inside `folder`); call after they are all written."""
    folder = Path(folder)
    sums = {Path(f).name: sha256_file(Path(f)) for f in files}
    return write_atomic(folder / SEAL_FILE, json.dumps(sums, indent=2, sort_keys=True) + "\n")


def check_seal(folder: str | os.PathLike, files: Iterable[str | os.PathLike]) -> tuple[bool, str | None]:
    """(reusable, why not): (True, None) when every file matches its recorded checksum;
    (False, None) when there is no cache yet; (False, reason) when there is a damaged one."""
    folder = Path(folder)
    files = [Path(f) for f in files]
    seal_path = folder / SEAL_FILE
    present = [f for f in files if f.is_file()]
    if not present and not seal_path.is_file():
        return False, None
    try:
        sums = json.loads(seal_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, f"no {SEAL_FILE} (written last: an earlier run stopped before finishing)"
    except (OSError, ValueError) as exc:
        return False, f"{SEAL_FILE} unreadable ({exc})"
    if not isinstance(sums, dict):
        return False, f"{SEAL_FILE} is not a JSON object"
    for f in files:
        if not f.is_file():
            return False, f"{f.name} missing"
        if sums.get(f.name) != sha256_file(f):
            return False, f"{f.name} does not match its checksum (truncated or edited)"
    return True, None


def dataset_files(dataset, count: int | None = None) -> list[Path]:
    """The files the first `count` samples (all with None) of a landmark data set read: each
    face's image and .pts (data/face300w.py), or MPII's annotation JSON and each record's
    image (data/mpii.py); FirstSamples and other wrappers by their `base`."""
    while hasattr(dataset, "base"):
        count = len(dataset) if count is None else min(count, len(dataset))
        dataset = dataset.base
    records = dataset.records[:count]
    if hasattr(dataset, "json_path"):  # MPII: every record is in the one JSON
        return [Path(dataset.json_path)] + list(dict.fromkeys(Path(r["image_path"]) for r in records))
    return [p for r in records for p in (Path(r.image_path), Path(r.pts_path))]


def feed_digest(h, value, leaf: Callable[[object], bytes | None] | None = None) -> bool:
    """Feed the content of `value` into the hash `h`: arrays by dtype, shape and bytes, lists,
    tuples, dicts and dataclasses item by item (a repr may shorten an array or leave a field out),
    numbers, strings and enums by their repr;
    `leaf(value)` gives the bytes of other array types (torch tensors), None where it does not
    know the type. False where a value has no content to feed (an object shown by its address, a
    function): a key that cannot see all of its input must not be made."""
    if leaf is not None and (data := leaf(value)) is not None:
        h.update(data)
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(f"L{type(value).__name__}{len(value)}".encode())
        return all(feed_digest(h, v, leaf) for v in value)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        return all(feed_digest(h, k, leaf) and feed_digest(h, v, leaf) for k, v in value.items())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"C{type(value).__module__}.{type(value).__qualname__}".encode())
        return all(feed_digest(h, f.name, leaf) and feed_digest(h, getattr(value, f.name), leaf)
                   for f in dataclasses.fields(value))
    else:
        text = repr(value)
        if " at 0x" in text:
            return False
        h.update(f"R{type(value).__qualname__}:{text}".encode())
    return True


class ProcessMemo:
    """Results kept in this process by a content key (feed_digest), copied in and out so that no
    caller changes a kept one; the least recently used go first beyond `limit_bytes` (`size(value)`
    each). A None key is never kept nor found."""

    def __init__(self, limit_bytes: int, size: Callable[[Any], int]) -> None:
        self.limit_bytes, self.size = limit_bytes, size
        self._kept: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, key: str | None) -> Any | None:
        if key is None or key not in self._kept:
            return None
        self._kept.move_to_end(key)
        return copy.deepcopy(self._kept[key])

    def put(self, key: str | None, value: Any) -> None:
        if key is None:
            return
        self._kept[key] = copy.deepcopy(value)
        while sum(self.size(v) for v in self._kept.values()) > self.limit_bytes:
            self._kept.popitem(last=False)


def files_digest(files: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over each file's name (relative to the files' common folder) and bytes, in order."""
    files = [Path(f) for f in files]
    common = Path(os.path.commonpath([f.resolve() for f in files])) if files else Path()
    h = hashlib.sha256()
    for f in files:
        rel = f.resolve().relative_to(common).as_posix() if f.resolve() != common else f.name
        h.update(f"{rel}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


# A build asks for its evaluation set's key once per timed INT8 variant and once for the
# gate: the files are read once per data set object (they do not change during a build).
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dataset_digest(dataset, count: int | None = None) -> str:
    """The content key of the first `count` samples of `dataset` (`dataset_files`, `files_digest`)."""
    known = _DIGESTS.setdefault(dataset, {})
    if count not in known:
        known[count] = files_digest(dataset_files(dataset, count))
    return known[count]
