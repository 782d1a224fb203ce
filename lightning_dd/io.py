"""Safe reading and atomic, checksummed writing of the framework's own files (the bottom layer).

Three kinds of files go through here:

* **Artifacts** (``distilled.pt``, ``condensed.pt``, teacher / encoder / quantized-model files):
  :func:`atomic_save` writes them, :func:`safe_load` / :func:`load_dict` read them with
  ``torch.load(weights_only=True)``; each holds its own ``format_version`` (a file without one is
  version 0, :func:`format_version`).
* **Cache entries** (decoded images, preprocessing/ZCA, expert trajectories and model pools,
  teachers, real-data statistics): :func:`save_cache` writes the entry atomically and then a
  sidecar ``<file>.sha256``, a JSON object ``{"format_version": 1, "sha256": <hex digest of the
  file's bytes>, "bytes": <size>}``; :func:`load_cache` checks size and digest before loading and
  returns ``None`` ("missing": the caller rebuilds) for a truncated, corrupted or unreadable
  entry, after logging a warning naming it and deleting it. An entry without a sidecar is cache
  format 0 (written by earlier versions, atomically but without a checksum): it is used when it
  loads, and its sidecar is added then.
* **Lightning checkpoints** (``last.ckpt``): :func:`check_checkpoint` reads one with
  ``weights_only=True`` before ``trainer.fit(ckpt_path=...)`` loads it again with Lightning's own
  loader (Lightning 2.6 passes ``weights_only=None`` to ``torch.load``, i.e. torch's default: safe
  from torch 2.6 on, unsafe before, and unsafe whenever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set).

Nothing here unpickles arbitrary objects: a file that would need it (a class, a function such as
``os.system``) is refused with :class:`UnsafeFileError` naming the file and the object, and is
never deleted (it is evidence, not corruption).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".sha256"
_UNSAFE = (re.compile(r"Unsupported global: GLOBAL (\S+)"), re.compile(r"unsupported GLOBAL (\S+)"),
           re.compile(r"Trying to (?:call reduce for unrecognized function|instantiate unsupported class) (\S+)"))


class UnsafeFileError(ValueError):
    """A file that only arbitrary unpickling could read (it references a class or function beyond
    tensors, numbers, strings, lists and dicts); refused, never loaded."""


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | Path, write: Callable) -> Path:
    """``write(fh)`` into a temporary file beside ``path``, fsync it, ``os.replace`` it onto
    ``path``, fsync the directory: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save(obj)`` to a temporary file beside ``path``, fsync, then ``os.replace``: a killed
    process never leaves half a file at ``path``. ``obj`` should hold only tensors, numbers,
    strings, lists, tuples and dicts (what :func:`safe_load` reads back)."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_save`)."""
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _unsafe_global(message: str) -> str | None:
    for pat in _UNSAFE:
        m = pat.search(message)
        if m:
            return m.group(1).rstrip(".,")
    return None


def safe_load(path: str | Path, what: str = "file", **kwargs):
    """``torch.load(path, weights_only=True, map_location="cpu")``: tensors, numbers, strings,
    lists, tuples and dicts only -- never unpickles arbitrary objects, so an untrusted file cannot
    run code (``kwargs`` go to ``torch.load``; ``mmap=True`` falls back to a plain read for files
    that cannot be memory-mapped).

    Raises:
        FileNotFoundError: no file. UnsafeFileError (a ValueError): the file references another
            object (a class, or a function such as ``os.system``); the message names ``path`` and
            the object. ValueError: not a torch file, or truncated/corrupt (the message names
            ``path`` and what torch said).
    """
    try:
        return torch.load(path, weights_only=True, map_location="cpu", **kwargs)
    except pickle.UnpicklingError as e:
        obj = _unsafe_global(str(e))
        if obj is None:  # not a pickle torch can read at all
            msg = str(e).split("WeightsUnpickler error:", 1)[-1]
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
            why = next((ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file"))),
                       lines[0] if lines else "")
            raise ValueError(f"{path}: not a readable torch file ({what}): {why[:300]}") from None
        raise UnsafeFileError(
            f"{path}: not loaded: this {what} holds objects other than tensors, numbers, strings, lists and dicts "
            f"(it holds a {obj}), and lightning_dd never unpickles those (they could run code); re-save it with "
            f"plain types only if you trust where it came from") from None
    except FileNotFoundError:
        raise
    except RuntimeError as e:
        if kwargs.get("mmap") and "mmap can only be used" in str(e):  # legacy / non-zip file
            return safe_load(path, what, **{k: v for k, v in kwargs.items() if k != "mmap"})
        raise ValueError(f"{path}: not a readable torch file ({what}): {type(e).__name__}: {str(e)[:300]}") from None
    except Exception as e:  # truncated / not a torch file: EOFError, KeyError, ...
        raise ValueError(f"{path}: not a readable torch file ({what}): {type(e).__name__}: {str(e)[:300]}") from None


def format_version(d: dict, path: str | Path, what: str, current: int) -> int:
    """The ``format_version`` of a loaded artifact dict ``d`` (a missing one is 0: files written
    before versions were recorded, or by hand).

    Raises:
        ValueError: a version that is not an int >= 0, or newer than ``current`` (written by a
            newer lightning_dd); the message names ``path``.
    """
    v = d.get("format_version", 0)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{path}: format_version must be an int >= 0, got {v!r} ({what})")
    if v > current:
        raise ValueError(f"{path}: this {what} has format version {v}, written by a newer lightning_dd; this one "
                         f"reads versions 0..{current} (upgrade lightning_dd)")
    return v


def load_dict(path: str | Path, keys: tuple[str, ...], what: str) -> dict:
    """Safely load (:func:`safe_load`, ``weights_only=True``) a saved artifact that must be a dict
    holding ``keys``.

    Raises:
        FileNotFoundError: no file at ``path``. UnsafeFileError / ValueError: not a torch file,
            objects beyond tensors/numbers/strings/lists/dicts, or not a dict with those keys
            (``what`` names the artifact in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    d = safe_load(path, what)
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise ValueError(f"{path}: not a lightning_dd {what} (expected keys {', '.join(keys)}, ...)")
    return d


def check_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """Read a Lightning checkpoint with ``weights_only=True`` (memory-mapped: the tensors are not
    read) before ``trainer.fit(ckpt_path=path)`` loads it; returns the dict (for stored settings).

    Raises:
        FileNotFoundError: no file. UnsafeFileError: it needs arbitrary unpickling (refused).
        ValueError: truncated / not a checkpoint; every message names ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    d = safe_load(path, what, mmap=True)
    if not isinstance(d, dict) or "state_dict" not in d:
        raise ValueError(f"{path}: not a Lightning {what} (no state_dict)")
    return d


def safe_fit_kwargs() -> dict:
    """``{"weights_only": True}`` for ``Trainer.fit(..., ckpt_path=...)`` when Lightning accepts the
    argument (2.6+), else ``{}`` (older Lightning then loads with torch's default, safe from torch
    2.6 on; :func:`check_checkpoint` before the fit refuses an unsafe file either way)."""
    import inspect

    import lightning

    return {"weights_only": True} if "weights_only" in inspect.signature(lightning.Trainer.fit).parameters else {}


# --- cache entries --------------------------------------------------------------------------
def sidecar(path: str | Path) -> Path:
    """The checksum file of cache entry ``path``: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _write_sidecar(path: Path) -> None:
    meta = {"format_version": CACHE_FORMAT_VERSION, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    atomic_write_text(json.dumps(meta), sidecar(path))


def save_cache(obj, path: str | Path) -> None:
    """Write cache entry ``path`` atomically (:func:`atomic_save`), then its checksum sidecar
    ``<path>.sha256`` (:func:`sidecar`). A kill between the two leaves a whole entry without a
    sidecar, which :func:`load_cache` treats as format 0 (used if it loads)."""
    path = Path(path)
    atomic_save(obj, path)
    _write_sidecar(path)


def _discard(path: Path, what: str, why: str) -> None:
    log.warning("%s %s is unusable (%s): deleted, it will be rebuilt", what, path, why)
    for p in (path, sidecar(path)):
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not delete %s: %s", p, e)


def load_cache(path: str | Path, what: str = "cache entry", check: Callable | None = None, **kwargs):
    """The cache entry at ``path``, verified, or ``None`` when the caller must (re)build it.

    ``None`` when there is no file, or (after a warning naming the file; the entry and its sidecar
    are deleted) when the sidecar is unreadable or of a newer format, the size or SHA-256 differs
    from the sidecar's (truncated, corrupted), torch cannot read the file, or ``check(obj)``
    raises (ValueError, KeyError, TypeError, IndexError, AttributeError: a wrong structure). An
    entry without a sidecar (cache format 0) gets one once it has loaded and passed ``check``.
    ``kwargs`` go to :func:`safe_load` (e.g. ``mmap=True``).

    Raises:
        UnsafeFileError: the entry needs arbitrary unpickling -- a planted file, not a corrupted
            one: refused and kept for inspection.
    """
    path = Path(path)
    if not path.is_file():
        return None
    side = sidecar(path)
    meta = None
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
            version, digest, size = int(meta["format_version"]), str(meta["sha256"]), int(meta["bytes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            _discard(path, what, f"its checksum file {side.name} is unreadable: {type(e).__name__}")
            return None
        if version > CACHE_FORMAT_VERSION:
            _discard(path, what, f"cache format {version}, newer than this lightning_dd's {CACHE_FORMAT_VERSION}")
            return None
        actual = path.stat().st_size
        if actual != size:
            _discard(path, what, f"truncated or overwritten: {actual} bytes, {size} were written")
            return None
        if file_sha256(path) != digest:
            _discard(path, what, "SHA-256 differs from the one recorded when it was written: corrupted")
            return None
    try:
        obj = safe_load(path, what, **kwargs)
    except UnsafeFileError:
        raise
    except ValueError as e:
        _discard(path, what, str(e).removeprefix(f"{path}: ")[:300])
        return None
    if check is not None:
        try:
            check(obj)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            _discard(path, what, f"unexpected contents: {type(e).__name__}: {str(e)[:200]}")
            return None
    if meta is None:
        try:
            _write_sidecar(path)
        except OSError as e:  # a read-only cache still works, unverified
            log.debug("could not add a checksum to %s: %s", path, e)
    return obj


def require_keys(*keys: str) -> Callable[[object], None]:
    """A ``check`` for :func:`load_cache`: the entry is a dict holding ``keys`` (else KeyError)."""
    def check(obj) -> None:
        if not isinstance(obj, dict):
            raise TypeError(f"expected a dict, got {type(obj).__name__}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise KeyError(f"missing keys {missing}")
    return check


def cache_key(spec: dict) -> str:
    """Stable 16-hex key of ``spec`` (the settings that determine a cached entry: expert
    trajectories, teachers, FP models, statistics, ZCA matrices): the SHA-1 of its JSON with sorted
    keys (values JSON cannot hold are written with ``str``)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
