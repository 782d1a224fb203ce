"""Safe reading and atomic writing of the framework's own files (the bottom layer)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a killed process never
    leaves half a file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_dict(path: str | Path, keys: tuple[str, ...], what: str) -> dict:
    """``torch.load`` a saved artifact that must be a dict holding ``keys``.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: not a dict with those keys (``what``
            names the artifact in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    d = torch.load(path, weights_only=False)
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise ValueError(f"{path}: not a lightning_dd {what} (expected keys {', '.join(keys)}, ...)")
    return d
