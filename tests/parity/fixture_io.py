"""Parity fixtures: tensors produced by the authors' own code on fixed inputs, saved with where they came from.

A generator script ``tests/parity/gen_<family>.py --reference PATH`` imports the authors' code from a
checkout of their public repository (read and run there, never copied into this repository), feeds
it fixed inputs and writes ``tests/parity/fixtures/<family>.pt`` through :func:`save_fixture`. The
parity tests (``test_parity_<family>.py``, mark ``parity``) feed the same inputs to our code and
compare with :func:`load_fixture`.

A fixture file is a plain dict, loadable with ``torch.load(weights_only=True)``::

    {"meta": {"repo": "owner/name", "commit": <40 hex>, "script": "tests/parity/gen_x.py",
              "torch": <version that generated it>, "replaced": <what of the reference was replaced, or "">},
     "cases": {<case name>: {<tensor or number or string name>: value, ...}, ...}}
"""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parents[2]


def reference_commit(checkout: str | Path) -> str:
    """The commit a reference checkout is at (``git rev-parse HEAD``).

    Raises:
        SystemExit: ``checkout`` is not a git work tree (the fixtures must name their commit).
    """
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"{checkout}: not a git checkout of the reference repository ({e})") from e
    return out


def add_reference_to_path(checkout: str | Path, *subdirs: str) -> Path:
    """Put a reference checkout (and the given sub-folders of it) first on ``sys.path`` so that its
    modules import by their own names; returns the checkout as an absolute path.

    Raises:
        SystemExit: the checkout or one of the sub-folders does not exist.
    """
    root = Path(checkout).resolve()
    for d in (root, *(root / s for s in subdirs)):
        if not d.is_dir():
            raise SystemExit(f"{d}: no such folder in the reference checkout")
    for d in reversed((root, *(root / s for s in subdirs))):
        sys.path.insert(0, str(d))
    return root


def save_fixture(family: str, cases: dict[str, dict[str, Any]], *, reference: str | Path, repo: str,
                 replaced: str = "") -> Path:
    """Write ``fixtures/<family>.pt`` (atomically) with the reference's commit; returns its path.

    Args:
        family: file stem, e.g. ``"dm"``.
        cases: case name -> {name: tensor | int | float | str | bool | list | dict of those}; inputs
            and the reference's outputs side by side. Tensors are saved detached, contiguous, on CPU.
        reference: the checkout the outputs were produced from.
        repo: ``owner/name`` of the public repository.
        replaced: what of the reference code was replaced to run here (a CUDA extension, a
            package pin), in words; empty when it ran as it is.
    """
    def plain(v):
        if isinstance(v, torch.Tensor):
            return v.detach().cpu().contiguous().clone()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    script = Path(inspect.stack()[1].filename).resolve()  # the generator (sys.argv[0] may be a reference script it ran)
    meta = {"repo": repo, "commit": reference_commit(reference),
            "script": str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else script.name,
            "torch": str(torch.__version__), "replaced": replaced}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{family}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"meta": meta, "cases": plain(cases)}, tmp)
    tmp.replace(path)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes) from {repo}@{meta['commit']}")
    return path


def load_fixture(family: str) -> dict[str, Any]:
    """``fixtures/<family>.pt`` as written by :func:`save_fixture` (``weights_only=True``).

    Raises:
        FileNotFoundError: the fixture was never generated (naming the file and its generator).
    """
    path = FIXTURES / f"{family}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing parity fixture; generate it with "
                                f"python tests/parity/gen_{family}.py --reference <checkout>")
    return torch.load(path, weights_only=True, map_location="cpu")
