"""Files written atomically: a run killed mid-write leaves the previous file whole, never a truncated one."""
import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path, write):
    """Call write(binary file) on a temporary file beside `path`, fsync it, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass
    return path


def atomic_save(obj, path):
    """torch.save(obj) to `path` atomically."""
    return atomic_write(path, lambda out: torch.save(obj, out))


def atomic_write_text(path, text):
    """`text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda out: out.write(text.encode()))
