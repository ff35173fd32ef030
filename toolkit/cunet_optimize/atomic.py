"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Every artifact goes through here (a temporary file or staging folder beside the target,
then a rename), so an interrupted command leaves nothing half-written: files through
`write_atomic` / `atomic_path`, folders (a build, a data set) through `staged_folder` /
`replace_folder`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """A temporary path next to `path` for a writer that wants a file name (torch.save,
    safetensors, onnx.save); it replaces `path` only if the block succeeds. `mode`:
    permissions of the result (default: 0666 less the umask, as for open())."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int | None = None) -> Path:
    """Write bytes or text (UTF-8, '\\n' newlines) to `path` atomically; `mode` sets permissions."""
    path = Path(path)
    with atomic_path(path, mode) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8", newline="\n")
        else:
            tmp.write_bytes(data)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def link_or_copy(source: str | os.PathLike, dest: str | os.PathLike) -> str:
    """`dest` as a hard link to `source` where the filesystem allows one (the bytes stored
    once), else a copy; returns which ("hard link" | "copy"). Only for files nothing rewrites
    in place: a writer that replaces a file (atomic_path, os.replace) unlinks it, leaving
    the other name with the old bytes, as a copy would."""
    try:
        os.link(source, dest)
        return "hard link"
    except OSError:  # another filesystem, or one without hard links (FAT, some network mounts)
        shutil.copyfile(source, dest)
        return "copy"


def replace_folder(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished folder `staging` to `final` (same parent). A folder already at `final`
    is renamed aside first (.<name>.partial-replaced-*/<name>, which workdir_lock's clean-up
    puts back if this process dies before the new one is in), put back if the rename in fails,
    and deleted last: no moment leaves neither."""
    staging, final = Path(staging), Path(final)
    previous = None
    if final.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-replaced-", dir=final.parent))
        os.replace(final, previous / final.name)
    try:
        os.replace(staging, final)
    except BaseException:
        if previous is not None:
            os.replace(previous / final.name, final)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


@contextmanager
def staged_folder(final: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """A hidden staging folder beside `final` (.<name>.partial-*) to write a whole folder into;
    it becomes `final` only if the block succeeds, and is removed otherwise. replace=True: it
    replaces a folder there (replace_folder; the caller decided beforehand that it may);
    replace=False: a folder another process put there meanwhile is kept (a shared cache whose
    writers all write the same thing, and whose readers must not see it vanish)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        if replace:
            replace_folder(staging, final)
        else:
            try:
                os.rename(staging, final)  # fails onto a non-empty folder: the first writer's stays
            except OSError:
                if not final.is_dir():
                    raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
