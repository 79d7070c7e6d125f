"""Writing outputs so that a failure never destroys what the user had.

Every file dynify writes (artifacts, checkpoints, ONNX and pt2 programs, JSON reports, plots,
caches) goes through `atomic_output`: the content is written to a temporary file in the same
folder and renamed over the target only once complete, so an interrupted or failed write leaves
the previous file untouched and never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it goes.

    The temporary file keeps `path`'s suffix, since some writers (onnx, torch.export, matplotlib)
    choose a format by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """`path.write_bytes(data)`, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`path.write_text(text)`, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)
