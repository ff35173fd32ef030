"""Checksummed caches: a cached result is reused only if every file is as it was written.

A cache folder (calib/<id>/) holds files written one by one; a kill between two
writes, a full disk or a hand edit can leave one damaged or missing. `seal` records
the SHA-256 of each file in checksums.json, written last; `check_seal` says whether
the cache can be reused, and why not, so the caller recomputes instead of failing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

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
