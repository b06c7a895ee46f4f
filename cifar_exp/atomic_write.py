"""Writing a file whole or not at all: a temporary file in the same folder, flushed and fsynced, then
renamed over the target. A reader, a crash or a second writer therefore meets the old file or the
new one, never half of one (os.replace is atomic within a file system)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

STALE_S = 3600  # a temporary file older than this was left by a killed writer


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write what replaces `path` (its folder is made if missing). When the block
    ends, the file is fsynced, given mode 0o644 (mkstemp's 0o600 would hide a shared cache from the
    team) and renamed over `path`; when the block or any of these steps raises, it is removed and
    `path` is left as it was. Temporaries a killed writer left behind are removed after STALE_S."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):  # another process removed or renamed it
            if time.time() - leftover.stat().st_mtime > STALE_S:
                leftover.unlink()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
