"""Atomic file writes: a reader never sees half a file, and an interrupted write loses nothing."""

from __future__ import annotations

import os
import tempfile


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
