"""Safe reading and atomic writing of the framework's own files (the bottom layer)."""
from __future__ import annotations

import os
import pickle
import re
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


def safe_load(path: str | Path, what: str = "file", **kwargs):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts
    only -- never unpickles arbitrary objects, so an untrusted file cannot run code (``kwargs`` go
    to ``torch.load``, e.g. ``mmap=True``).

    Raises:
        FileNotFoundError: no file. ValueError: not a torch file, or it holds objects other than
            the above (the message names ``path`` and what torch refused).
    """
    try:
        return torch.load(path, weights_only=True, map_location="cpu", **kwargs)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if m is None:  # not a pickle torch can read at all
            msg = str(e).split("WeightsUnpickler error:", 1)[-1]
            why = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
            raise ValueError(f"{path}: not a readable torch file ({what}): {why[:300]}") from None
        raise ValueError(f"{path}: not loaded: this {what} holds objects other than tensors, numbers, strings, "
                         f"lists and dicts (it holds a {m.group(1)}), and lightning_dd never unpickles those "
                         f"(they could run code)") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated / not a torch file: RuntimeError, EOFError, KeyError, ...
        raise ValueError(f"{path}: not a readable torch file ({what}): {type(e).__name__}: {str(e)[:300]}") from None


def load_dict(path: str | Path, keys: tuple[str, ...], what: str) -> dict:
    """Safely load (:func:`safe_load`, ``weights_only=True``) a saved artifact that must be a dict
    holding ``keys``.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: not a torch file, objects beyond
            tensors/numbers/strings/lists/dicts, or not a dict with those keys (``what`` names the
            artifact in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    d = safe_load(path, what)
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise ValueError(f"{path}: not a lightning_dd {what} (expected keys {', '.join(keys)}, ...)")
    return d
