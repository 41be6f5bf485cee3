"""Atomic writes of files and folders: a reader never sees half of one, and an interrupted write
loses nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def write_atomic(path: str, data: bytes | str) -> None:
    """Replace `path` by `data` all at once: written to a temp file in the same folder, then
    renamed over it. A write that fails or is interrupted leaves the old file as it was and
    removes its temp file; the temp name is unique, so two writers never share one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)  # the mode open() would give, not mkstemp's 0600
        with os.fdopen(handle, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp_path, path)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written temp file behind
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        raise


def check_replaceable(out_dir: str, marker: str, flag: str) -> None:
    """ValueError unless `out_dir` is new, empty, or a folder this program wrote (it holds `marker`,
    e.g. an export's manifest.json): atomic_directory replaces the whole folder, so a mistyped
    --out must never name a run or a home folder."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, marker)):
        raise ValueError(f"{flag} {out_dir}: a folder with other files (no {marker}); it would be replaced "
                         f"whole: name a new folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{flag} {out_dir}: a file, not a folder")


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """Yield a fresh temp directory beside `out_dir`; when the block completes, it replaces
    `out_dir` (an existing one is moved aside first and deleted after). On any exception the
    temp directory is removed and `out_dir` is left as it was."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        _replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(new: str, target: str) -> None:
    if not os.path.exists(target):
        os.rename(new, target)
        return
    old = new + "-old"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
