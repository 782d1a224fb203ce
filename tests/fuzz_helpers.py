"""Machinery of the reader fuzz suite (tests/test_fuzz_readers.py): file trees as dicts, byte-level
mutations as hypothesis strategies, crafted pickles, and the oracle that sorts every outcome into
``clear_error`` / ``valid`` / ``bad`` and tallies it per reader.

The oracle (:func:`run_case`): a reader given a generated input must either

* raise one of the clear error types (``DataFormatError`` / ``DataNotFoundError`` for data
  readers, ``ValueError`` / ``FileNotFoundError`` for artifacts) whose message names the file (or
  folder) at fault and is printable as UTF-8, leaving no new file in the cache folder; or
* succeed, when the case is not one that must fail, with an output that passes the reader's
  validity check (shapes, dtypes, label range, finite values; equal to the expected data for
  intact inputs).

Anything else (another exception type, a message that names no file, a silent success on a case
that must fail, garbage output, a leftover cache file, a crafted pickle that ran) counts as
``bad``; the suite's target is 0.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from lightning_dd.data.readers import printable

#: examples per reader (the issue asks for >= 200); LDD_FUZZ_EXAMPLES raises it for a longer hunt
EXAMPLES = int(os.environ.get("LDD_FUZZ_EXAMPLES", "220"))
#: LDD_FUZZ_RANDOM=1: new random inputs each run (default: derandomized, the same inputs in CI)
RANDOM = os.environ.get("LDD_FUZZ_RANDOM", "") not in ("", "0")

#: LDD_FUZZ_DUMP=<file>: each input is pickled there before it is read (post-mortem of a crash)
DUMP = os.environ.get("LDD_FUZZ_DUMP", "")

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                phases=[Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)

#: a file tree: relative path -> bytes (``None`` = an empty folder); names may hold the surrogates
#: Python decodes non-UTF-8 file-name bytes to (``"\udcff"`` is the byte 0xff)
Tree = dict[str, "bytes | None"]

NON_UTF8 = ("caf\udce9", "\udcff\udcfe", "x\udc80y", "\udcc3(")  # latin-1 e-acute, 0xff 0xfe, lone bytes


@dataclass
class Case:
    """One generated input: the tree to write, what was done to it, whether every correct reader
    must refuse it, and the strings (file or folder names) one of which the error must name."""

    tree: Tree
    kind: str
    must_fail: bool
    names: tuple[str, ...]
    expect_same: bool = False  # an intact (or harmlessly varied) input: the output must equal the original's


@dataclass
class Row:
    tried: int = 0
    clear_error: int = 0
    valid: int = 0
    bad: int = 0
    kinds: dict = field(default_factory=lambda: defaultdict(int))
    examples: list = field(default_factory=list)


TALLY: dict[str, Row] = defaultdict(Row)


def write_tree(root: Path, tree: Tree) -> None:
    for rel, data in tree.items():
        p = root / rel
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def files_under(d: Path | None) -> set[str]:
    if d is None or not d.exists():
        return set()
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


class Exploit:
    """Pickles as a call of ``fn(*args)``: what a crafted file would run on an unsafe load."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def exploits(marker: Path) -> list:
    """Payloads that would create ``marker`` if unpickled (nothing destructive)."""
    import builtins
    import subprocess

    code = f"open({str(marker)!r}, 'w').close()"
    out = [Exploit(os.system, (f"touch {marker}",)), Exploit(builtins.exec, (code,)),
           Exploit(builtins.eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",)),
           Exploit(subprocess.call, (["touch", str(marker)],))]
    try:
        from numpy.testing._private.utils import runstring  # a known numpy gadget: exec(astr, dict)
        out.append(Exploit(runstring, (code, {})))
    except ImportError:
        pass
    return out


@st.composite
def crafted_pickle(draw, marker: Path, wrap=lambda payload: payload) -> bytes:
    """A pickle (protocol 0-5) of ``wrap(payload)`` where the payload runs code when unpickled."""
    payload = draw(st.sampled_from(exploits(marker)))
    return pickle.dumps(wrap(payload), protocol=draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))


@st.composite
def byte_case(draw, base: Tree, binary: frozenset[str] = frozenset(), only: tuple[str, ...] | None = None) -> Case:
    """One file of ``base`` damaged at the byte level: truncated, emptied, replaced by garbage,
    bytes flipped, or garbage appended. Truncated/emptied/garbage files of a ``binary`` format
    (whose readers see the whole structure) must fail; the rest may still be valid."""
    names = sorted(n for n in (only or base) if base[n] is not None)
    name = draw(st.sampled_from(names))
    data = base[name]
    kind = draw(st.sampled_from(["truncate", "empty", "garbage", "flip", "append"]))
    if kind == "truncate":
        new = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "empty":
        new = b""
    elif kind == "garbage":
        new = draw(st.binary(min_size=1, max_size=300))
        if new == data:
            new += b"\x00"
    elif kind == "flip":
        buf = bytearray(data)
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=6)):
            buf[pos] ^= draw(st.integers(1, 255))
        new = bytes(buf)
    else:
        new = data + draw(st.binary(min_size=1, max_size=64))
    tree = dict(base)
    tree[name] = new
    must = kind in ("empty", "garbage", "truncate") and name in binary
    return Case(tree, f"{kind}", must_fail=must or kind == "empty", names=(Path(name).name,))


def run_case(reader: str, case: Case, call, work: Path, clear: tuple, validate, cache_dir: Path | None = None,
             marker: Path | None = None, may_stay=lambda rel: False) -> None:
    """Run ``call()`` on the input already written under ``work``, classify and tally the outcome
    (see the module docstring). ``validate(out, case)`` raises AssertionError on garbage output;
    after an error no new file may be in ``cache_dir`` unless ``may_stay(relative path)`` (e.g. the
    complete, atomically written files of a resumable render)."""
    row = TALLY[reader]
    row.tried += 1
    row.kinds[case.kind] += 1
    before = files_under(cache_dir)
    problem, outcome = None, None
    if DUMP:  # the input about to be read, for a crash that takes the process down (a segfault)
        Path(DUMP).write_bytes(pickle.dumps((reader, case)))
    try:
        out = call()
    except clear as e:
        msg = str(e)
        try:
            msg.encode("utf-8")
        except UnicodeEncodeError:
            problem = f"unprintable message {msg!r}"
        if problem is None and not any(printable(n) in msg for n in case.names):
            problem = f"message names none of {[printable(n) for n in case.names]}: {type(e).__name__}: {msg[:300]}"
        new = {f for f in files_under(cache_dir) - before if not may_stay(f)}
        if problem is None and new:
            problem = f"files left in the cache after the error: {sorted(new)[:5]}"
        outcome = "clear_error"
    except Exception as e:  # noqa: BLE001 - everything else is what the suite hunts
        tb = traceback.extract_tb(e.__traceback__)[-1]
        problem = f"{type(e).__name__}: {str(e)[:300]} (at {Path(tb.filename).name}:{tb.lineno})"
    else:
        if case.must_fail:
            problem = "silent success on an input that must be refused"
        else:
            try:
                validate(out, case)
                outcome = "valid"
            except AssertionError as e:
                problem = f"garbage output: {e}"
    if marker is not None and marker.exists():
        problem = f"a crafted pickle RAN CODE (created {marker})"
        marker.unlink()
    leftovers = [f for f in files_under(cache_dir) if f.endswith(".tmp") or "/.tmp" in f or ".tmp." in f]
    if problem is None and leftovers:
        problem = f"temporary files left in the cache: {leftovers[:5]}"
    if problem is None:
        setattr(row, outcome, getattr(row, outcome) + 1)
    else:
        row.bad += 1
        if len(row.examples) < 8:
            row.examples.append(f"[{case.kind}] {printable(problem)}")


def fresh_dir(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=parent))


def cleanup(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)


def assert_reader_clean(reader: str, minimum: int | None = None) -> None:
    """At least ``minimum`` (:data:`EXAMPLES`) inputs tried and none ``bad``."""
    row = TALLY[reader]
    minimum = EXAMPLES if minimum is None else minimum
    assert row.tried >= minimum, f"{reader}: only {row.tried} inputs tried (< {minimum})"
    assert row.bad == 0, (f"{reader}: {row.bad} of {row.tried} inputs did not end in a clear error or a valid "
                          f"result:\n  " + "\n  ".join(row.examples))


def summary() -> str:
    lines = [f"{'reader':<22}{'tried':>7}{'clear error':>13}{'valid':>7}{'bad':>5}"]
    for name, r in TALLY.items():
        lines.append(f"{name:<22}{r.tried:>7}{r.clear_error:>13}{r.valid:>7}{r.bad:>5}")
    tot = [sum(getattr(r, k) for r in TALLY.values()) for k in ("tried", "clear_error", "valid", "bad")]
    lines.append(f"{'total':<22}{tot[0]:>7}{tot[1]:>13}{tot[2]:>7}{tot[3]:>5}")
    return "\n".join(lines)


def npy_bytes(arr, allow_pickle: bool = False) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def npz_bytes(**arrays) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
