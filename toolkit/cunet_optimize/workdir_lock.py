"""One writer per workdir: `build` and `calibrate` hold an exclusive lock on WORKDIR.

A second command into the same workdir waits for the first (and says so) instead of
racing it over engines/ and calib/. The lock is an flock on WORKDIR/.cunet-optimize.lock:
the kernel releases it when its holder exits, killed or not, so it never goes stale.
Holding it also means no other build is running here, so staging folders
(engines/.<name>.partial-*) left by killed builds can be removed safely.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_FILE = ".cunet-optimize.lock"
PARTIAL_GLOB = ".*.partial-*"  # pipeline/build.py's staging folders


@contextmanager
def workdir_lock(workdir: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold WORKDIR's lock for the block; wait (saying for whom) while another process has it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            log.warning("%s is in use by %s; waiting for it to finish (Ctrl-C to stop)", workdir, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_partials(engines_dir: str | os.PathLike) -> list[str]:
    """Remove staging folders of builds that were killed; call only while holding the lock.

    A build replacing another renames the old one aside (pipeline/build.py commit_build:
    .<name>.partial-replaced-*/<name>) before renaming the new one in; killed between the
    two renames, the old build is put back here instead of removed."""
    engines_dir = Path(engines_dir)
    removed = []
    for partial in sorted(engines_dir.glob(PARTIAL_GLOB)) if engines_dir.is_dir() else []:
        if not partial.is_dir():
            continue
        name = partial.name[1:].split(".partial-replaced-")[0]
        if ".partial-replaced-" in partial.name and (partial / name).is_dir() and not (engines_dir / name).exists():
            os.replace(partial / name, engines_dir / name)
            log.warning("restored %s: the build replacing it was interrupted", engines_dir / name)
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial.name)
    if removed:
        log.info("removed %d staging folder(s) of interrupted builds in %s", len(removed), engines_dir)
    return removed
