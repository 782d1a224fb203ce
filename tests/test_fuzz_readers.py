"""Bad input, tried at volume (issue 17): property-based fuzzing (hypothesis) of every data reader
and of the artifact loaders with truncated, emptied, garbage and bit-flipped files, wrong dtypes
and shapes, NaN/inf, empty classes, labels out of range, missing keys, non-UTF-8 names and crafted
pickles. Each input must end in a clear error naming the file (``DataFormatError`` /
``DataNotFoundError``; ``ValueError`` / ``FileNotFoundError`` for artifacts), or, where the input
is still valid, in a correct result; nothing may be left half-written in a cache (oracle:
tests/fuzz_helpers.py). Per-reader counts are printed at the end of the module
(``tried / clear error / valid / bad``; target bad = 0).

Inputs are derandomized (the same in every CI run); ``LDD_FUZZ_RANDOM=1`` draws new ones and
``LDD_FUZZ_EXAMPLES=N`` sets the examples per reader (default 220).
"""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fuzz_helpers import (EXAMPLES, FUZZ, NON_UTF8, TALLY, Case, assert_reader_clean, byte_case, cleanup,
                          crafted_pickle, exploits, fresh_dir, npy_bytes, npz_bytes, run_case, summary, write_tree)
from lightning_dd.data.readers import DataFormatError, DataNotFoundError

DATA_ERRORS = (DataFormatError, DataNotFoundError)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    """Print the per-reader table when the module ends (shown without ``-s`` too: output capture
    is lifted for it)."""
    yield
    text = "\nreader fuzz (issue 17): inputs tried / ended in a clear error / valid result / bad\n" + summary()
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        print(text)


# =================================================================== CIFAR python pickles
CIFAR_DIR = "cifar10/cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _cifar_batch(i: int, n: int = 2, protocol: int = 2, bytes_keys: bool = True) -> bytes:
    rng = np.random.default_rng(i)
    d = {"batch_label": f"batch {i}", "labels": [(2 * i + j) % 10 for j in range(n)],
         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"f{i}_{j}.png" for j in range(n)]}
    if bytes_keys:  # what the original Python-2 pickles give under encoding="bytes"
        d = {k.encode(): v for k, v in d.items()}
    return pickle.dumps(d, protocol=protocol)


def _cifar_tree(protocol: int = 2, bytes_keys: bool = True) -> dict:
    t = {f"{CIFAR_DIR}/{f}": _cifar_batch(i, protocol=protocol, bytes_keys=bytes_keys)
         for i, f in enumerate(CIFAR_TRAIN + ["test_batch"])}
    meta = {b"label_names": CIFAR_NAMES, b"num_cases_per_batch": 2, b"num_vis": 3072}
    t[f"{CIFAR_DIR}/batches.meta"] = pickle.dumps(meta if bytes_keys else {k.decode(): v for k, v in meta.items()},
                                                  protocol=protocol)
    return t


CIFAR_BASE = _cifar_tree()


def _cifar_expected():
    from lightning_dd.data.readers import read_cifar  # noqa: F401 (the reader under test)

    parts = [pickle.loads(CIFAR_BASE[f"{CIFAR_DIR}/{f}"]) for f in CIFAR_TRAIN]
    return (np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32),
            np.concatenate([p[b"labels"] for p in parts]))


def _validate_cifar(out, case: Case):
    assert out.train_images.dtype == torch.uint8 and out.train_images.shape[1:] == (3, 32, 32)
    assert out.train_labels.dtype == torch.int64 and len(out.train_labels) == len(out.train_images)
    assert len(out.test_labels) == len(out.test_images) and len(out.train_images) > 0
    for y in (out.train_labels, out.test_labels):
        assert int(y.min()) >= 0 and int(y.max()) < 10, "label out of range"
    assert len(out.classes) == 10 and all(isinstance(c, str) for c in out.classes)
    if case.expect_same:
        x, y = _cifar_expected()
        assert np.array_equal(out.train_images.numpy(), x) and np.array_equal(out.train_labels.numpy(), y)


@st.composite
def _cifar_semantic(draw, marker):
    f = draw(st.sampled_from(CIFAR_TRAIN + ["test_batch"]))
    path = f"{CIFAR_DIR}/{f}"
    d = pickle.loads(CIFAR_BASE[path])
    n = len(d[b"labels"])
    kind = draw(st.sampled_from(["missing_key", "dtype", "shape", "nan", "label_range", "label_count", "label_type",
                                 "not_dict", "meta", "crafted", "valid_variant", "empty_batch", "all_train_empty"]))
    tree, must, names, same = dict(CIFAR_BASE), True, (f,), False
    if kind == "missing_key":
        del d[draw(st.sampled_from([b"data", b"labels"]))]
    elif kind == "dtype":
        dt = draw(st.sampled_from(["float32", "float64", "int64", "int16", ">u2", "bool", "complex64", "U3"]))
        d[b"data"] = d[b"data"].astype(dt)
    elif kind == "shape":
        shape = draw(st.sampled_from([(n, 3071), (n, 3073), (n * 3072,), (n, 3, 32, 32), (n, 3072, 1), (0,)]))
        d[b"data"] = np.zeros(shape, np.uint8)
    elif kind == "nan":
        x = d[b"data"].astype(np.float32)
        x[0, draw(st.integers(0, 3071))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        d[b"data"] = x
    elif kind == "label_range":
        d[b"labels"][draw(st.integers(0, n - 1))] = draw(st.integers(-10**6, -1) | st.integers(10, 10**6))
    elif kind == "label_count":
        d[b"labels"] = [0] * draw(st.integers(0, n + 3).filter(lambda k: k != n))
    elif kind == "label_type":
        d[b"labels"] = draw(st.sampled_from([[0.5] * n, ["1"] * n, [[1]] * n, [True] * n, [2**70] * n,
                                             np.zeros(n, np.float32), None, 3, {"a": 1}, [[0], [1, 2]]]))
    elif kind == "not_dict":
        d = draw(st.sampled_from([[1, 2], 3, None, "data", (b"data",), b"bytes"]))
    elif kind == "meta":
        path, names = f"{CIFAR_DIR}/batches.meta", ("batches.meta",)
        m = {b"label_names": draw(st.sampled_from([CIFAR_NAMES[:9], CIFAR_NAMES + [b"x"], [b"a"] * 10,
                                                   list(range(10)), b"airplane", [b"\xff\xfe"] + CIFAR_NAMES[1:],
                                                   None, []]))}
        if draw(st.booleans()):
            m = {b"other": 1}
        d = m
    elif kind == "crafted":
        where = draw(st.sampled_from(["top", "data", "labels", "meta"]))
        if where == "meta":
            path, names = f"{CIFAR_DIR}/batches.meta", ("batches.meta",)
        wrap = (lambda p: p) if where in ("top", "meta") else (lambda p: {**d, where.encode(): p})
        tree[path] = draw(crafted_pickle(marker, wrap))
        return Case(tree, "crafted_pickle", True, names)
    elif kind == "valid_variant":  # other pickle protocols, str keys: must read the same
        tree = _cifar_tree(protocol=draw(st.integers(2, 5)), bytes_keys=draw(st.booleans()))
        return Case(tree, kind, False, (), expect_same=True)
    elif kind == "empty_batch":  # one batch without images is legal
        d[b"data"], d[b"labels"], must = np.zeros((0, 3072), np.uint8), [], False
    else:  # every training batch empty
        for g in CIFAR_TRAIN:
            e = pickle.loads(CIFAR_BASE[f"{CIFAR_DIR}/{g}"])
            e[b"data"], e[b"labels"] = np.zeros((0, 3072), np.uint8), []
            tree[f"{CIFAR_DIR}/{g}"] = pickle.dumps(e, protocol=2)
        return Case(tree, kind, True, ("cifar-10-batches-py",))
    tree[path] = pickle.dumps(d, protocol=draw(st.integers(2, 5)))
    return Case(tree, kind, must, names, same)


def test_fuzz_cifar_pickles(tmp_path):
    from lightning_dd.data.readers import read_cifar

    marker = tmp_path / "PWNED"

    @FUZZ
    @given(st.one_of(byte_case(CIFAR_BASE, binary=frozenset(CIFAR_BASE)), _cifar_semantic(marker)))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            run_case("cifar_pickles", case, lambda: read_cifar(work / "cifar10", "cifar10"), work, DATA_ERRORS,
                     _validate_cifar, marker=marker)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("cifar_pickles")


# =================================================================== image files: class folders, ImageNet layouts
def _image_bytes(seed: int, size=(4, 4), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def _any_mode_image(draw, rel: str, size=(4, 4)) -> bytes:
    """An image for file ``rel`` in any mode its format can store (all are converted to RGB)."""
    jpeg = rel.lower().endswith((".jpg", ".jpeg"))
    mode = draw(st.sampled_from(["RGB", "L", "CMYK"] if jpeg else ["RGB", "L", "RGBA", "P", "1", "LA", "I;16"]))
    return _image_bytes(draw(st.integers(0, 99)), size, mode, "JPEG" if jpeg else "PNG")


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


CF_BASE = {"cf/train/cat/0.png": _image_bytes(0), "cf/train/cat/1.png": _image_bytes(1),
           "cf/train/dog/0.jpg": _image_bytes(2, fmt="JPEG"), "cf/train/dog/1.png": _image_bytes(3),
           "cf/test/cat/0.png": _image_bytes(4), "cf/test/dog/0.png": _image_bytes(5)}
CF_CLASSES = ["cat", "dog"]


def _per_class(tree: dict, split: str) -> dict[str, list[bytes]]:
    out: dict[str, list] = {}
    for rel, data in tree.items():
        parts = rel.split("/")
        if data is not None and len(parts) == 4 and parts[1] == split and parts[3].endswith((".png", ".jpg")):
            out.setdefault(parts[2], []).append(data)
    return out


def _same_images(x: torch.Tensor, y: torch.Tensor, classes: list[str], expected: dict[str, list[bytes]]):
    for c, name in enumerate(classes):
        got = sorted(x[y == c].permute(0, 2, 3, 1).numpy().tobytes(order="C")[i:i + 48]
                     for i in range(0, int((y == c).sum()) * 48, 48))
        want = sorted(_decoded(b).tobytes() for b in expected[name])
        assert got == want, f"class {name}: decoded images differ from the files"


def _validate_cf(out, case: Case):
    for x, y in ((out.train_images, out.train_labels), (out.test_images, out.test_labels)):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3 and len(x) == len(y) > 0
        assert int(y.min()) >= 0 and int(y.max()) < len(out.classes)
    assert all(isinstance(c, str) for c in out.classes)
    if case.expect_same:
        assert out.classes == CF_CLASSES
        _same_images(out.train_images, out.train_labels, out.classes, _per_class(case.tree, "train"))
        _same_images(out.test_images, out.test_labels, out.classes, _per_class(case.tree, "test"))


@st.composite
def _cf_semantic(draw):
    tree = dict(CF_BASE)
    files = sorted(CF_BASE)
    kind = draw(st.sampled_from(["size", "empty_class", "emptied_class", "non_utf8_class", "non_utf8_file",
                                 "non_utf8_corrupt", "mode", "classes_differ", "no_split", "other_suffix",
                                 "text_as_image"]))
    split = draw(st.sampled_from(["train", "test"]))
    if kind == "size":
        f = draw(st.sampled_from(files))
        tree[f] = _image_bytes(draw(st.integers(0, 99)), size=draw(st.sampled_from([(5, 4), (4, 5), (1, 1), (9, 9)])))
        return Case(tree, kind, True, (f.rsplit("/", 1)[1],))
    if kind == "empty_class":
        name = draw(st.sampled_from(["bird", "zebra", "a", "cat2"] + list(NON_UTF8)))
        tree[f"cf/{split}/{name}"] = None
        return Case(tree, kind, True, (name,))
    if kind == "emptied_class":
        c = draw(st.sampled_from(CF_CLASSES))
        tree = {k: v for k, v in tree.items() if not k.startswith(f"cf/{split}/{c}/")}
        tree[f"cf/{split}/{c}"] = None
        return Case(tree, kind, True, (c,))
    if kind == "non_utf8_class":
        name = draw(st.sampled_from(NON_UTF8))
        tree = {k.replace("/dog/", f"/{name}/"): v for k, v in tree.items()}
        return Case(tree, kind, True, (name,))
    if kind in ("non_utf8_file", "non_utf8_corrupt"):
        f = draw(st.sampled_from(files))
        name = draw(st.sampled_from(NON_UTF8)) + f[-4:]
        data = tree.pop(f)
        tree[f.rsplit("/", 1)[0] + "/" + name] = data if kind == "non_utf8_file" else draw(st.binary(max_size=40))
        return Case(tree, kind, kind == "non_utf8_corrupt", (name,), expect_same=kind == "non_utf8_file")
    if kind == "mode":
        f = draw(st.sampled_from(files))
        tree[f] = draw(_any_mode_image(f))
        return Case(tree, kind, False, ())
    if kind == "classes_differ":
        tree[f"cf/{split}/{draw(st.sampled_from(['bird', 'ant', 'zz']))}/0.png"] = _image_bytes(7)
        return Case(tree, kind, True, ("cf",))
    if kind == "no_split":
        tree = {k: v for k, v in tree.items() if not k.startswith(f"cf/{split}/")}
        return Case(tree, kind, True, ("cf",))
    if kind == "other_suffix":  # not an image suffix: ignored
        tree[f"cf/{split}/cat/{draw(st.sampled_from(['notes.txt', 'x.npy', '.DS_Store', 'y.png.bak']))}"] = \
            draw(st.binary(max_size=30))
        return Case(tree, kind, False, (), expect_same=True)
    f = draw(st.sampled_from(files))
    tree[f] = draw(st.sampled_from([b"hello", b"<html>not an image</html>", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]))
    return Case(tree, kind, True, (f.rsplit("/", 1)[1],))


def test_fuzz_class_folders(tmp_path):
    from lightning_dd.data.readers import read_class_folders

    @FUZZ
    @given(st.one_of(byte_case(CF_BASE), _cf_semantic()))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            cache = work / "cache"
            run_case("class_folders", case, lambda: read_class_folders(work / "cf", cache_dir=cache, workers=1), work,
                     DATA_ERRORS, _validate_cf, cache_dir=cache)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("class_folders")


IMAGENET_BASE = {
    "imagenet": {"im/train/n01/a.JPEG": _image_bytes(10, (6, 5), fmt="JPEG"), "im/train/n01/b.png": _image_bytes(11),
                 "im/train/n02/c.JPEG": _image_bytes(12, (5, 7), fmt="JPEG"), "im/val/n01/d.png": _image_bytes(13),
                 "im/val/n02/e.JPEG": _image_bytes(14, fmt="JPEG")},
    "tiny": {"im/train/n01/images/a.JPEG": _image_bytes(15, fmt="JPEG"), "im/train/n02/images/b.png": _image_bytes(16),
             "im/val/images/v0.JPEG": _image_bytes(17, fmt="JPEG"), "im/val/images/v1.png": _image_bytes(18),
             "im/val/val_annotations.txt": b"v0.JPEG\tn01\t0\t0\t4\t4\nv1.png\tn02\t0\t0\t4\t4\n"},
    "flat": {"im/n01/a.JPEG": _image_bytes(19, (7, 6), fmt="JPEG"), "im/n02/b.png": _image_bytes(20),
             "im/n03/c.png": _image_bytes(21, (4, 9))},
}


def _validate_imagenet(out, case: Case):
    flat = case.kind.startswith("flat:")
    classes = sorted({p.split("/")[1] if flat else p.split("/")[2] for p in case.tree
                      if (p.count("/") == 2 if flat else p.startswith("im/train/"))})
    for x, y in ((out.train_images, out.train_labels), (out.test_images, out.test_labels)):
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, 4, 4) and len(x) == len(y) > 0
        assert int(y.min()) >= 0 and int(y.max()) < len(out.classes)
    assert out.classes == classes, f"classes {out.classes}, expected {classes}"


@st.composite
def _imagenet_case(draw):
    layout = draw(st.sampled_from(sorted(IMAGENET_BASE)))
    base = IMAGENET_BASE[layout]
    tree = dict(base)
    kinds = ["bytes", "empty_class", "non_utf8_class", "non_utf8_file", "sizes_modes"]
    kinds += {"imagenet": ["val_class_unknown"], "flat": [],
              "tiny": ["ann_non_utf8", "ann_fields", "ann_path", "ann_wnid", "ann_repeat", "ann_missing",
                       "ann_harmless"]}[layout]
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        c = draw(byte_case(base))
        c.kind = f"{layout}:{c.kind}"
        if "val_annotations.txt" in c.names:
            c.must_fail = c.must_fail or c.kind.endswith("garbage")
        return c
    if kind == "empty_class":
        parent = {"imagenet": draw(st.sampled_from(["im/train", "im/val"])), "tiny": "im/train", "flat": "im"}[layout]
        name = draw(st.sampled_from(["n09", "n00"] + list(NON_UTF8[:1])))
        tree[f"{parent}/{name}"] = None
        if layout == "imagenet" and parent == "im/val":
            tree[f"im/train/{name}/z.png"] = _image_bytes(3)  # a known class, empty in val
        return Case(tree, f"{layout}:{kind}", True, (name,))
    if kind == "non_utf8_class":
        name = draw(st.sampled_from(NON_UTF8))
        tree = {k.replace("/n02/", f"/{name}/"): v for k, v in tree.items()}
        tree = {k: (v.replace(b"n02", name.encode("utf-8", "surrogateescape")) if k.endswith(".txt") else v)
                for k, v in tree.items()}
        return Case(tree, f"{layout}:{kind}", True, (name,))
    if kind == "non_utf8_file":
        f = draw(st.sampled_from(sorted(k for k in base if not k.endswith(".txt"))))
        name = draw(st.sampled_from(NON_UTF8)) + ".png"
        tree[f.rsplit("/", 1)[0] + "/" + name] = tree.pop(f)
        if layout == "tiny" and "/val/" in f:
            old = f.rsplit("/", 1)[1].encode()
            ann = "im/val/val_annotations.txt"
            tree[ann] = tree[ann].replace(old, name.encode("utf-8", "surrogateescape"))
            return Case(tree, f"{layout}:{kind}", True, ("val_annotations.txt",))  # not UTF-8 text any more
        return Case(tree, f"{layout}:{kind}", False, ())
    if kind == "sizes_modes":  # any size and mode: resized and converted
        f = draw(st.sampled_from(sorted(k for k in base if not k.endswith(".txt"))))
        size = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
        tree[f] = draw(_any_mode_image(f, size))
        return Case(tree, f"{layout}:{kind}", False, ())
    if kind == "val_class_unknown":
        tree["im/val/n77/f.png"] = _image_bytes(4)
        return Case(tree, f"{layout}:{kind}", True, ("n77",))
    ann = "im/val/val_annotations.txt"
    text = base[ann]
    if kind == "ann_non_utf8":
        pos = draw(st.integers(0, len(text)))
        tree[ann] = text[:pos] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe9", b"\x80\x80"])) + text[pos:]
    elif kind == "ann_fields":
        tree[ann] = text + draw(st.sampled_from([b"v0.JPEG\n", b"\tn01\n", b"lonely", b"v1.png n02\n"]))
    elif kind == "ann_path":
        bad = draw(st.sampled_from(["../train/n01/images/a.JPEG", "images/v0.JPEG", "/etc/passwd", "..", "."]))
        tree[ann] = text + f"{bad}\tn01\t0\t0\t4\t4\n".encode()
    elif kind == "ann_wnid":
        tree[ann] = text.replace(b"n02", draw(st.sampled_from([b"n99", b"N02", b"n02 ", b""])), 1)
    elif kind == "ann_repeat":
        tree[ann] = text + text.splitlines(keepends=True)[draw(st.integers(0, 1))].replace(b"n01", b"n02")
    elif kind == "ann_missing":
        tree[ann] = text + draw(st.sampled_from([b"v9.JPEG\tn01\n", b"gone.png\tn02\t1\n"]))
    else:  # blank lines, CRLF, extra fields: still the same data
        tree[ann] = draw(st.sampled_from([b"\n" + text + b"\n\n", text.replace(b"\n", b"\r\n"),
                                          text.replace(b"\t4\n", b"\t4\textra\n")]))
        return Case(tree, f"{layout}:{kind}", False, ())
    return Case(tree, f"{layout}:{kind}", True, ("val_annotations.txt",))


def test_fuzz_imagenet_folders(tmp_path):
    from lightning_dd.data.imagenet import ImageNetDataModule

    @FUZZ
    @given(_imagenet_case())
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            cache = work / "cache"
            dm = ImageNetDataModule(str(work / "im"), name="fz", image_size=4, resize_size=4, decode_workers=1,
                                    max_memory_gib=None, cache_dir=str(cache))
            run_case("imagenet_folders", case, dm.read, work, DATA_ERRORS, _validate_imagenet, cache_dir=cache)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("imagenet_folders")


# =================================================================== graphs: Planetoid, GraphSAINT, fraud .mat
def _one_hot(labels, k: int = 3) -> np.ndarray:
    out = np.zeros((len(labels), k), dtype=np.int32)
    out[np.arange(len(labels)), labels] = 1
    return out


def _planetoid_arrays(seed: int = 0, n_all: int = 510, n_test: int = 6, n_lab: int = 6, f: int = 5):
    """A tiny graph in Planetoid's raw layout: ``allx`` (the first ``n_all`` nodes, of which ``x``
    are the ``n_lab`` labeled ones), ``tx`` (the test nodes ``n_all..n_all+n_test-1``, listed
    shuffled in test.index), one-hot labels over 3 classes, a random ``graph`` dict."""
    import collections

    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n = n_all + n_test
    feats = (rng.random((n, f)) < 0.3).astype(np.float32)
    labels = np.arange(n) % 3
    test_index = rng.permutation(np.arange(n_all, n))
    graph = collections.defaultdict(list)
    for a, b in rng.integers(0, n, (3 * n, 2)):
        graph[int(a)].append(int(b))
    for i in range(n):
        graph[i]  # noqa: B018 - every node a key, as in the real files
    return {"x": sp.csr_matrix(feats[:n_lab]), "allx": sp.csr_matrix(feats[:n_all]),
            "tx": sp.csr_matrix(feats[test_index]), "y": _one_hot(labels[:n_lab]), "ally": _one_hot(labels[:n_all]),
            "ty": _one_hot(labels[test_index]), "graph": graph,
            "test.index": "\n".join(map(str, test_index)).encode() + b"\n"}


def _planetoid_tree(arrays: dict, key: str = "cora", protocol: int = 2) -> dict:
    return {f"pl/raw/ind.{key}.{k}": (v if k == "test.index" else pickle.dumps(v, protocol=protocol))
            for k, v in arrays.items()}


PL_ARRAYS = _planetoid_arrays()
PL_BASE = _planetoid_tree(PL_ARRAYS)
PL_PICKLES = frozenset(k for k in PL_BASE if not k.endswith("test.index"))


def _validate_graph(out, case: Case):
    n = out.x.shape[0]
    assert out.x.dim() == 2 and out.x.dtype == torch.float32 and torch.isfinite(out.x).all()
    assert out.y.shape == (n,) and out.y.dtype == torch.int64 and int(out.y.min()) >= 0
    ei = out.edge_index
    assert ei.dim() == 2 and ei.shape[0] == 2 and (ei.numel() == 0 or (int(ei.min()) >= 0 and int(ei.max()) < n))
    for m in ("train_mask", "val_mask", "test_mask"):
        assert out[m].shape == (n,) and out[m].dtype == torch.bool
    assert out.train_mask.any()


@st.composite
def _planetoid_semantic(draw, marker):
    import scipy.sparse as sp

    arrays = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in PL_ARRAYS.items()}
    kind = draw(st.sampled_from(["crafted", "rows", "widths", "not_one_hot", "nan", "bad_sparse", "dtype",
                                 "test_index", "graph", "too_few_nodes", "empty_class", "not_matrix",
                                 "valid_citeseer", "valid_protocol"]))
    key, name = "cora", None
    if kind == "crafted":
        name = draw(st.sampled_from(sorted(k.rsplit(".", 1)[1] for k in PL_PICKLES)))
        tree = dict(PL_BASE)
        tree[f"pl/raw/ind.cora.{name}"] = draw(crafted_pickle(marker, lambda p: draw(st.sampled_from(
            [p, [p], {0: [p]}, (p, 1)]))))
        return Case(tree, kind, True, (f"ind.cora.{name}",))
    if kind == "rows":  # x/y, allx/ally or tx/ty disagree
        name = draw(st.sampled_from(["x", "y", "allx", "ally", "tx", "ty"]))
        a = arrays[name]
        arrays[name] = a[: a.shape[0] - draw(st.integers(1, 2))] if draw(st.booleans()) else \
            (sp.vstack([a, a[:1]]).tocsr() if sp.issparse(a) else np.vstack([a, a[:1]]))
        partner = {"x": "y", "y": "x", "allx": "ally", "ally": "allx", "tx": "ty", "ty": "tx"}[name]
        return Case(_planetoid_tree(arrays), kind, True, (f"ind.cora.{name}", f"ind.cora.{partner}", "test.index"))
    if kind == "widths":
        name = draw(st.sampled_from(["x", "tx", "allx", "y", "ty", "ally"]))
        a = arrays[name]
        arrays[name] = sp.hstack([a, a[:, :1]]).tocsr() if sp.issparse(a) else np.hstack([a, a[:, :1]])
        return Case(_planetoid_tree(arrays), kind, True, (f"ind.cora.{name}", "raw"))
    if kind == "not_one_hot":
        name = draw(st.sampled_from(["y", "ty", "ally"]))
        a = arrays[name].astype(np.float64)
        a[draw(st.integers(0, len(a) - 1)), draw(st.integers(0, 2))] = draw(st.sampled_from([2, -1, 0.5, 1e9]))
        if draw(st.booleans()):
            a[0] = 1  # two (three) ones in a row
        arrays[name] = a
    elif kind == "nan":
        name = draw(st.sampled_from(["x", "tx", "allx", "y", "ty", "ally"]))
        a = arrays[name]
        dense = (a.toarray() if sp.issparse(a) else a).astype(np.float64)
        dense[draw(st.integers(0, len(dense) - 1)), draw(st.integers(0, dense.shape[1] - 1))] = \
            draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))
        arrays[name] = sp.csr_matrix(dense) if sp.issparse(a) and draw(st.booleans()) else dense
    elif kind == "bad_sparse":  # indices or indptr out of range / inconsistent
        name = draw(st.sampled_from(["x", "tx", "allx"]))
        m = arrays[name].copy()
        what = draw(st.sampled_from(["index", "indptr", "shape"]))
        if what == "index" and m.nnz:
            m.indices[draw(st.integers(0, m.nnz - 1))] = draw(st.sampled_from([-1, 5, 10**6]))
        elif what == "indptr":
            m.indptr[-1] = m.indptr[-1] + draw(st.integers(1, 50))
        else:
            m._shape = (m.shape[0], draw(st.sampled_from([0, 2, 10**9])))
        arrays[name] = m
    elif kind == "dtype":
        name = draw(st.sampled_from(["x", "tx", "allx", "y", "ty", "ally"]))
        a = arrays[name]
        dense = a.toarray() if sp.issparse(a) else a
        arrays[name] = dense.astype(draw(st.sampled_from(["U2", "complex64", "bool", "O", "S1"])))
    elif kind == "test_index":
        name = "test.index"
        text = arrays["test.index"]
        arrays[name] = draw(st.sampled_from([
            text + b"7\n", text.replace(b"51", b"x1", 1), b"", text.split(b"\n", 1)[1],
            text + text.split(b"\n", 1)[0] + b"\n", text.replace(b"\n", b"\n-3\n", 1), b"\xff\xfe" + text,
            text.replace(b"\n", b" 1.5\n", 1), b"9" * 40 + b"\n" + text, text.replace(b"510", b"1", 1)]))
    elif kind == "graph":
        name = "graph"
        n = 516
        bad = draw(st.sampled_from(["key_range", "nbr_range", "nbr_type", "value_type", "not_dict"]))
        g = dict(arrays["graph"])
        if bad == "key_range":
            g[draw(st.sampled_from([-1, n, 10**9]))] = [0]
        elif bad == "nbr_range":
            g[0] = [draw(st.sampled_from([-5, n, n + 7]))]
        elif bad == "nbr_type":
            g[1] = [draw(st.sampled_from([1.5, "2", None, [3]]))]
        elif bad == "value_type":
            g[2] = draw(st.sampled_from([5, "abc", None, {1: 2}]))
        else:
            g = draw(st.sampled_from([[[1, 2]], 7, "graph", None]))
        arrays["graph"] = g
    elif kind == "too_few_nodes":  # the public split needs len(y) + 500 nodes in allx
        small = _planetoid_arrays(n_all=draw(st.integers(7, 505)))
        return Case(_planetoid_tree(small), kind, True, ("ind.cora.allx",))
    elif kind == "empty_class":
        for nm in ("y", "ty", "ally"):
            a = arrays[nm]
            a[:, 0], a[:, 1] = 0, a[:, 1] | a[:, 0]
        return Case(_planetoid_tree(arrays), kind, True, ("ind.cora.ally",))
    elif kind == "not_matrix":
        name = draw(st.sampled_from(["x", "tx", "allx", "y", "ty", "ally"]))
        arrays[name] = draw(st.sampled_from([None, 3, "x", [1, 2], {"a": 1}, np.zeros(4), np.zeros((2, 2, 2))]))
    elif kind == "valid_citeseer":  # CiteSeer's isolated test nodes: gaps in test.index, zero rows added
        keep = {0, 5} | draw(st.sets(st.integers(1, 4), max_size=3))  # first and last test node stay
        order = [int(v) for v in PL_ARRAYS["test.index"].split()]
        sel = [i for i, t in enumerate(order) if t - 510 in keep]
        arrays["tx"], arrays["ty"] = arrays["tx"][sel], arrays["ty"][sel]
        arrays["test.index"] = "\n".join(str(order[i]) for i in sel).encode()
        return Case(_planetoid_tree(arrays, "citeseer"), kind, False, ())
    else:
        return Case(_planetoid_tree(arrays, protocol=draw(st.integers(2, 5))), kind, False, ())
    return Case(_planetoid_tree(arrays), kind, True, (f"ind.cora.{name}",))


def test_fuzz_planetoid(tmp_path):
    from lightning_dd.data.graphs import read_planetoid

    marker = tmp_path / "PWNED"

    @FUZZ
    @given(st.one_of(byte_case(PL_BASE, binary=PL_PICKLES), _planetoid_semantic(marker)))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            key = "citeseer" if any("citeseer" in k for k in case.tree) else "cora"
            run_case("planetoid", case, lambda: read_planetoid(work / "pl", key), work, DATA_ERRORS, _validate_graph,
                     marker=marker)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("planetoid")


def test_planetoid_reader_equals_torch_geometric_on_real_cora(shared_data):
    """The validating, restricted-unpickling reader gives torch_geometric's tensors on real Cora."""
    from torch_geometric.io import read_planetoid_data

    from lightning_dd.data.graphs import read_planetoid_files

    raw = shared_data / "planetoid" / "Cora" / "raw"
    ref, got = read_planetoid_data(str(raw), "cora"), read_planetoid_files(raw, "cora")
    for k in ("x", "y", "edge_index", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(ref[k], got[k]), k


def _mat_bytes(d: dict, **kw) -> bytes:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, d, **kw)
    return buf.getvalue()


def _fraud_dict(seed: int = 0, n: int = 12):
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    adj = sp.random(n, n, density=0.3, random_state=seed, format="csc")
    return {"features": sp.csc_matrix(rng.random((n, 3))), "label": (np.arange(n) % 2)[None].astype(np.float64),
            "homo": ((adj + adj.T) > 0).astype(np.float64)}


MAT_BASE = {"Fraud.mat": _mat_bytes(_fraud_dict())}


@st.composite
def _mat_semantic(draw):
    import scipy.sparse as sp

    d = _fraud_dict(draw(st.integers(0, 5)))
    n = 12
    kind = draw(st.sampled_from(["missing_key", "nan", "features_type", "rows", "label_value", "label_classes",
                                 "label_shape", "homo_shape", "homo_type", "no_nodes", "valid_variant"]))
    must = True
    if kind == "missing_key":
        del d[draw(st.sampled_from(["features", "label", "homo"]))]
    elif kind == "nan":
        x = d["features"].toarray()
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1e300]))
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, 2))] = bad
        d["features"] = sp.csc_matrix(x) if draw(st.booleans()) else x
    elif kind == "features_type":
        d["features"] = draw(st.sampled_from([np.array(["a", "b"]), np.array([[1 + 2j] * 3] * n),
                                              {"a": np.zeros(3)}, np.zeros((n, 3, 2)),
                                              np.array([np.zeros(2), np.zeros(3)], dtype=object)]))
    elif kind == "rows":
        d["features"] = d["features"][: n - draw(st.integers(1, 5))]
    elif kind == "label_value":
        lab = d["label"].copy()
        lab[0, draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.5, -1, np.nan, np.inf, 1e300]))
        d["label"] = lab
    elif kind == "label_classes":  # one class only, or a class with no node
        d["label"] = draw(st.sampled_from([np.zeros((1, n)), (np.arange(n) % 2 * 2)[None].astype(float)]))
    elif kind == "label_shape":
        d["label"] = draw(st.sampled_from([np.zeros((2, n)), np.zeros((1, n + 1)), np.zeros((n, 1, 1)), "abc"]))
    elif kind == "homo_shape":
        d["homo"] = d["homo"][: n - draw(st.integers(1, 3))]
    elif kind == "homo_type":
        d["homo"] = draw(st.sampled_from([np.array(["x"] * n), {"a": 1}, np.zeros((n, n, 1))]))
    elif kind == "no_nodes":
        d = {"features": np.zeros((0, 3)), "label": np.zeros((1, 0)), "homo": sp.csc_matrix((0, 0))}
    else:  # dense features, (N, 1) labels, dense adjacency, compression, integer labels: all fine
        must = False
        if draw(st.booleans()):
            d["features"] = d["features"].toarray()
            if draw(st.booleans()):
                d["features"] = d["features"] > 0.5  # logical 0/1 features
        if draw(st.booleans()):
            d["label"] = d["label"].T.astype(draw(st.sampled_from(["int8", "uint16", "float32", "int64"])))
        if draw(st.booleans()):
            d["homo"] = d["homo"].toarray()
        return Case({"Fraud.mat": _mat_bytes(d, do_compression=draw(st.booleans()))}, kind, False, ())
    return Case({"Fraud.mat": _mat_bytes(d, do_compression=draw(st.booleans()))}, kind, must, ("Fraud.mat",))


def test_fuzz_fraud_mat(tmp_path):
    from lightning_dd.data.graphs import read_fraud_mat

    @FUZZ
    @given(st.one_of(byte_case(MAT_BASE), _mat_semantic()))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            run_case("fraud_mat", case, lambda: read_fraud_mat(work / "Fraud.mat"), work, DATA_ERRORS,
                     _validate_graph)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("fraud_mat")


def _saint_tree(n: int = 10, seed: int = 0, multi: bool = False) -> dict:
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    adj = sp.random(n, n, density=0.3, random_state=seed, format="csr")
    buf = io.BytesIO()
    sp.save_npz(buf, adj)
    cmap = {str(i): ([int(b) for b in rng.integers(0, 2, 3)] if multi else i % 3) for i in range(n)}
    return {"gs/adj_full.npz": buf.getvalue(), "gs/feats.npy": npy_bytes(rng.random((n, 4)).astype(np.float32)),
            "gs/class_map.json": json.dumps(cmap).encode(),
            "gs/role.json": json.dumps({"tr": [0, 1, 2, 3], "va": [4, 5], "te": [6, 7, 8, 9]}).encode()}


SAINT_BASE = _saint_tree()


@st.composite
def _saint_semantic(draw):
    import scipy.sparse as sp

    tree = dict(SAINT_BASE)
    n = 10
    kind = draw(st.sampled_from(["cmap", "role", "feats", "adj", "valid_variant"]))
    if kind == "cmap":
        cmap = json.loads(SAINT_BASE["gs/class_map.json"])
        bad = draw(st.sampled_from(["missing", "extra", "negative", "string", "float", "mixed", "key", "empty_class",
                                    "not_dict", "non_utf8", "bool"]))
        if bad == "missing":
            del cmap[str(draw(st.integers(0, n - 1)))]
        elif bad == "extra":
            cmap[str(draw(st.sampled_from([n, -1, 10**6])))] = 0
        elif bad == "negative":
            cmap["3"] = draw(st.integers(-10**6, -1))
        elif bad == "string":
            cmap["3"] = "cat"
        elif bad == "float":
            cmap["3"] = draw(st.sampled_from([1.5, 1.0, float("nan")]))
        elif bad == "mixed":
            cmap["3"] = [0, 1, 1]
        elif bad == "key":
            cmap["x"] = cmap.pop("3")
        elif bad == "empty_class":
            cmap = {k: (0 if v == 1 else v) for k, v in cmap.items()}
        elif bad == "bool":
            cmap["3"] = True
        data = json.dumps(cmap).encode() if bad not in ("not_dict", "non_utf8") else \
            draw(st.sampled_from([b"[1, 2]", b"3", b"null", b'"x"', b"{}"])) if bad == "not_dict" else \
            json.dumps(cmap).encode().replace(b'"3"', b'"\xff"')
        tree["gs/class_map.json"] = data
        return Case(tree, f"cmap:{bad}", True, ("class_map.json",))
    if kind == "role":
        role = json.loads(SAINT_BASE["gs/role.json"])
        bad = draw(st.sampled_from(["range", "type", "no_tr", "not_dict"]))
        if bad == "range":
            role[draw(st.sampled_from(["tr", "va", "te"]))].append(draw(st.sampled_from([-1, n, 10**9])))
        elif bad == "type":
            role[draw(st.sampled_from(["tr", "va", "te"]))] = draw(st.sampled_from([[1.5], ["1"], 3, None, [[1]]]))
        elif bad == "no_tr":
            role.pop("tr") if draw(st.booleans()) else role.update(tr=[])
        else:
            role = draw(st.sampled_from([[0, 1], 5, "tr"]))
        tree["gs/role.json"] = json.dumps(role).encode()
        return Case(tree, f"role:{bad}", True, ("role.json",))
    if kind == "feats":
        arr = draw(st.sampled_from([np.full((n, 4), np.nan, np.float32), np.zeros(n), np.zeros((n, 4, 1)),
                                    np.array([["a"] * 4] * n), np.zeros((n, 4), np.complex64), np.zeros((0, 4)),
                                    np.zeros((n, 4), bool), np.array([[np.inf] * 4] * n)]))
        if draw(st.booleans()) and arr.dtype.kind == "f" and arr.size:
            arr = arr.astype(arr.dtype.newbyteorder(">"))  # big-endian is fine, the NaN/inf are not
        tree["gs/feats.npy"] = npy_bytes(arr) if draw(st.integers(0, 7)) else npy_bytes(np.array([{"a": 1}]), True)
        return Case(tree, "feats", True, ("feats.npy",))
    if kind == "adj":
        bad = draw(st.sampled_from(["shape", "indices"]))
        if bad == "shape":
            m = sp.random(n + draw(st.sampled_from([-1, 1, 5])), n, density=0.3, format="csr", random_state=1)
        else:
            m = sp.random(n, n, density=0.3, format="csr", random_state=1)
            m.indices[draw(st.integers(0, m.nnz - 1))] = draw(st.sampled_from([n, 10**6, -1]))
        buf = io.BytesIO()
        sp.save_npz(buf, m)
        tree["gs/adj_full.npz"] = buf.getvalue()
        return Case(tree, f"adj:{bad}", True, ("adj_full.npz",))
    # multi-label maps, big-endian float64 features, other sparse formats: all fine
    tree = _saint_tree(multi=draw(st.booleans()), seed=draw(st.integers(0, 9)))
    if draw(st.booleans()):
        tree["gs/feats.npy"] = npy_bytes(np.ones((n, 4), ">f8"))
    return Case(tree, "valid_variant", False, ())


def test_fuzz_graphsaint(tmp_path):
    from lightning_dd.data.graphs import read_graphsaint

    @FUZZ
    @given(st.one_of(byte_case(SAINT_BASE, binary=frozenset({"gs/adj_full.npz", "gs/feats.npy"})), _saint_semantic()))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            run_case("graphsaint", case, lambda: read_graphsaint(work / "gs"), work, DATA_ERRORS,
                     lambda out, c: _validate_graph(out, c) if out.y.dim() == 1 else None)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("graphsaint")


# =================================================================== point-cloud videos: npz, skeleton text
def _video(seed: int, t: int = 3, n: int = 5) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(t, n, 3)) * 300).astype(np.float32)


PV_BASE = {"pv/a01_s01_e01_sdepth.npz": npz_bytes(point_clouds=_video(0)),
           "pv/a02_s06_e01_sdepth.npz": npz_bytes(point_clouds=_video(1)),
           "pv/a03_s02_e02_sdepth.npz": npz_bytes(point_clouds=_video(2, 2, 7))}
PV_NPZ = frozenset(PV_BASE)


def _validate_pv(dm, case: Case):
    videos = dm.train_videos + dm.test_videos
    assert len(videos) == len(dm.train_labels) + len(dm.test_labels) > 0
    for v in videos:
        assert len(v) >= 1 and all(f.dim() == 2 and f.shape[1] == 3 and len(f) > 0 and f.dtype == torch.float32
                                   and torch.isfinite(f).all() for f in v)
    labels = torch.cat([dm.train_labels, dm.test_labels])
    assert int(labels.min()) >= 0 and int(labels.max()) < dm.num_classes


@st.composite
def _pv_semantic(draw, marker):
    tree = dict(PV_BASE)
    f = draw(st.sampled_from(sorted(PV_BASE)))
    name = f.rsplit("/", 1)[1]
    kind = draw(st.sampled_from(["missing_key", "object", "shape", "empty", "nan", "dtype", "name", "crafted",
                                 "npy_not_npz", "valid_variant"]))
    arrays = {"point_clouds": _video(3)}
    if kind == "missing_key":
        arrays = {draw(st.sampled_from(["points", "point_cloud", "x"])): _video(3)}
    elif kind == "object":  # frames of different sizes need allow_pickle (refused by default)
        arr = np.empty(2, dtype=object)
        arr[:] = [_video(4)[0], _video(5, 1, 7)[0]]
        tree[f] = npz_bytes_pickled(point_clouds=arr)
        return Case(tree, kind, True, (name,))
    elif kind == "shape":
        arrays["point_clouds"] = np.zeros(draw(st.sampled_from([(3, 5, 2), (3, 5, 4), (5, 3), (3,), (2, 3, 5, 3),
                                                                 ()])), np.float32)
    elif kind == "empty":
        arrays["point_clouds"] = np.zeros(draw(st.sampled_from([(0, 5, 3), (3, 0, 3)])), np.float32)
    elif kind == "nan":
        v = _video(6).astype(draw(st.sampled_from(["float32", "float64", "float16"])))
        v[draw(st.integers(0, 2)), draw(st.integers(0, 4)), draw(st.integers(0, 2))] = \
            draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300 if v.dtype == np.float64 else np.inf]))
        arrays["point_clouds"] = v
    elif kind == "dtype":
        arrays["point_clouds"] = _video(7).astype(draw(st.sampled_from(["bool", "complex64", "U4", "S3", "V8"])))
    elif kind == "name":  # label -1, label beyond num_classes, no aXX_sYY_eZZ
        new = draw(st.sampled_from(["a00_s01_e01_sdepth.npz", "a21_s01_e01_sdepth.npz", "a99_s03_e01.npz",
                                    "video.npz", "aXX_s01_e01.npz"]))
        tree[f"pv/{new}"] = tree.pop(f)
        return Case(tree, kind, True, (new, "a21", "a99", "pv"))
    elif kind == "crafted":  # an object array whose unpickling would run code
        arr = np.empty(1, dtype=object)
        arr[0] = draw(st.sampled_from(exploits(marker)))
        tree[f] = npz_bytes_pickled(point_clouds=arr)
        return Case(tree, kind, True, (name,))
    elif kind == "npy_not_npz":
        tree[f] = npy_bytes(_video(8)) if draw(st.booleans()) else pickle.dumps({"point_clouds": _video(8)})
        return Case(tree, kind, True, (name,))
    else:  # integer or float64 or big-endian frames, non-UTF-8 tails of names, extra keys: all fine
        v = _video(9).astype(draw(st.sampled_from(["float64", ">f4", "int16", "int32", "<f8", "float16"])))
        extra = {"labels": np.arange(3)} if draw(st.booleans()) else {}
        tree[f] = npz_bytes(point_clouds=v, **extra)
        if draw(st.booleans()):
            tree[f.replace("_sdepth", "_" + draw(st.sampled_from(NON_UTF8)))] = tree.pop(f)
        return Case(tree, kind, False, ())
    tree[f] = npz_bytes(**arrays)
    return Case(tree, kind, True, (name,))


def npz_bytes_pickled(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=True, **arrays)
    return buf.getvalue()


def test_fuzz_point_video_npz(tmp_path):
    from lightning_dd.data.point_video import PointVideoDataModule

    marker = tmp_path / "PWNED"

    @FUZZ
    @given(st.one_of(byte_case(PV_BASE, binary=PV_NPZ), _pv_semantic(marker)))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            dm = PointVideoDataModule(format="npz", root=str(work / "pv"), cache_dir=str(work / "cache"),
                                      num_classes=20)

            def read():
                dm.setup()
                return dm

            run_case("point_video_npz", case, read, work, DATA_ERRORS, _validate_pv, cache_dir=work / "cache",
                     marker=marker)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("point_video_npz")


def _skeleton_text(shared: bool = True) -> bytes:
    """Two frames of a real MSR-Action3D skeleton file (20 lines of ``x y z confidence`` each)."""
    from conftest import SHARED_DATA

    real = SHARED_DATA / "msr_action3d" / "skeleton3D" / "a01_s01_e01_skeleton3D.txt"
    lines = real.read_bytes().splitlines(keepends=True)[:40]
    return b"".join(lines)


SK_TEXT = _skeleton_text()
SK_BASE = {"sk/a01_s01_e01_skeleton3D.txt": SK_TEXT, "sk/a02_s06_e01_skeleton3D.txt": SK_TEXT}


def _validate_sk(out, case: Case):
    assert (out / "manifest.json").is_file(), "no manifest after a successful render"
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(out.glob("*.npz"))
    assert len(files) == manifest["rendered"] >= 0
    for f in files:
        with np.load(f) as z:
            v = z["point_clouds"]
        assert v.ndim == 3 and v.shape[1:] == (8, 3) and np.isfinite(v).all()


@st.composite
def _sk_semantic(draw):
    tree = dict(SK_BASE)
    f = draw(st.sampled_from(sorted(SK_BASE)))
    name = f.rsplit("/", 1)[1]
    lines = SK_TEXT.splitlines()
    kind = draw(st.sampled_from(["nan", "columns", "lines", "tokens", "non_utf8", "name", "behind_camera",
                                 "huge", "never_tracked", "valid_variant"]))
    must = True
    if kind == "nan":
        i = draw(st.integers(0, 39))
        lines[i] = draw(st.sampled_from([b"nan 0.1 2.0 1", b"0.1 inf 2.0 1", b"0 0 -inf 0", b"1e50 0 2 1"]))
    elif kind == "columns":
        i = draw(st.integers(0, 39))
        lines[i] = lines[i] + draw(st.sampled_from([b" 1", b" 1 2"])) if draw(st.booleans()) else \
            b" ".join(lines[i].split()[:draw(st.integers(1, 3))])
        if draw(st.booleans()):  # every line
            lines = [ln + b" 0" for ln in lines]
    elif kind == "lines":
        lines = lines[: draw(st.integers(0, 39).filter(lambda k: k != 20))]
    elif kind == "tokens":
        i = draw(st.integers(0, 39))
        lines[i] = draw(st.sampled_from([b"a b c d", b"0.1,0.2,0.3,1", b"0x10 1 2 3", b"-- 1 2 3", b"1 2 3 True"]))
    elif kind == "non_utf8":
        i = draw(st.integers(0, 39))
        lines[i] = lines[i] + draw(st.sampled_from([b"\xff", b" \xe9", b"\xc3("]))
    elif kind == "name":
        new = draw(st.sampled_from(["a00_s01_e01_skeleton3D.txt", "ax_s01_e01_skeleton3D.txt",
                                    "a_s_e_skeleton3D.txt", "aZ1_sQ_e2_skeleton3D.txt"]))
        tree[f"sk/{new}"] = tree.pop(f)
        return Case(tree, kind, True, (new,))
    elif kind == "behind_camera":  # every joint of a tracked frame behind the camera: nothing to see
        lines = [b" ".join(ln.split()[:2] + [b"-2.5", b"1"]) for ln in lines]
    elif kind == "huge":
        scale = draw(st.sampled_from([1e30, 1e20, -1e35]))
        lines = [b" ".join([str(float(v) * scale).encode() for v in ln.split()[:3]] + [b"1"]) for ln in lines]
    elif kind == "never_tracked":  # all-zero frames: listed as skipped, not an error
        lines, must = [b"0 0 0 0"] * 40, False
    else:  # CRLF line ends, extra spaces, a trailing blank line: same data
        must = False
        sep = draw(st.sampled_from([b"\r\n", b"\n"]))
        lines = [b"  " + b"   ".join(ln.split()) for ln in lines] if draw(st.booleans()) else lines
        tree[f] = sep.join(lines) + sep + (b"\n" if draw(st.booleans()) else b"")
        return Case(tree, kind, False, ())
    tree[f] = b"\n".join(lines) + b"\n"
    return Case(tree, kind, must, (name,))


def test_fuzz_skeleton_render(tmp_path):
    from lightning_dd.data.point_video import render_skeleton_folder

    @FUZZ
    @given(st.one_of(byte_case(SK_BASE), _sk_semantic()))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            cache = work / "cache"
            # after an error: the complete npz of videos rendered before it may stay (the render resumes),
            # never a manifest (it marks a complete folder) nor a temporary file
            run_case("skeleton_text", case,
                     lambda: render_skeleton_folder(work / "sk", cache, points_per_frame=8, samples_per_frame=300),
                     work, DATA_ERRORS, _validate_sk, cache_dir=cache, may_stay=lambda rel: rel.endswith("_sdepth.npz"))
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("skeleton_text")


# =================================================================== the decode cache of class folders
CACHE_MTIME_NS = 1_700_000_000_000_000_000


def _pin_mtimes(root) -> None:
    """Fixed mtimes: the cache key (names, sizes, mtimes) is the same in every example."""
    import os

    for p in sorted(root.rglob("*")):
        if p.is_file():
            os.utime(p, ns=(CACHE_MTIME_NS, CACHE_MTIME_NS))


def _cache_base(tmp_path_factory):
    from lightning_dd.data.readers import read_class_folders

    work = tmp_path_factory.mktemp("cache_base")
    write_tree(work, CF_BASE)
    _pin_mtimes(work / "cf")
    fresh = read_class_folders(work / "cf", cache_dir=work / "cache", workers=1)
    entries = {str(p.relative_to(work)): p.read_bytes() for p in (work / "cache").rglob("*") if p.is_file()}
    assert len(entries) == 2, entries.keys()  # the entry and its checksum sidecar
    return fresh, entries


@st.composite
def _cache_case(draw, entries: dict, marker):
    entry = next(k for k in entries if k.endswith(".pt"))
    side = next(k for k in entries if not k.endswith(".pt"))
    tree = {**CF_BASE, **entries}
    kind = draw(st.sampled_from(["bytes", "bytes_sidecar", "crafted", "content", "no_sidecar"]))
    if kind == "bytes":
        c = draw(byte_case(tree, only=(entry,)))
        c.kind, c.must_fail, c.names = f"entry:{c.kind}", False, (entry.rsplit("/", 1)[1],)
        return c
    if kind == "bytes_sidecar":
        c = draw(byte_case(tree, only=(side,)))
        c.kind, c.must_fail, c.names = f"sidecar:{c.kind}", False, (side.rsplit("/", 1)[1],)
        return c
    if kind == "no_sidecar":  # an entry from an earlier version (no checksum): used, and given one
        del tree[side]
        return Case(tree, kind, False, ())
    if kind == "crafted":  # a planted entry whose unpickling would run code: refused, kept as evidence
        buf = io.BytesIO()
        torch.save({"train_images": draw(st.sampled_from(exploits(marker)))}, buf)
        tree[entry] = buf.getvalue()
        keep_side = draw(st.booleans())  # with the old checksum it is corrupt (deleted, decoded again, never
        if not keep_side:                # unpickled); without one it must be refused as unsafe
            del tree[side]
        return Case(tree, kind, not keep_side, (entry.rsplit("/", 1)[1],))
    # wrong contents under a matching checksum (a writer bug): must not be served as the data
    d = torch.load(io.BytesIO(entries[entry]), weights_only=True)
    what = draw(st.sampled_from(["labels_range", "image_shape", "classes", "dtype", "missing", "counts"]))
    if what == "labels_range":
        d["train_labels"] = d["train_labels"].clone()
        d["train_labels"][0] = draw(st.sampled_from([-1, 2, 99]))
    elif what == "image_shape":
        d["test_images"] = torch.zeros(2, 3, 5, 4, dtype=torch.uint8)
    elif what == "classes":
        d["classes"] = draw(st.sampled_from([["cat"], ["cat", "dog", "eel"], "catdog", [1, 2]]))
    elif what == "dtype":
        d["train_images"] = d["train_images"].float()
    elif what == "missing":
        del d[draw(st.sampled_from(sorted(d)))]
    else:
        d["train_images"], d["train_labels"] = d["train_images"][:1], d["train_labels"][:1]
    buf = io.BytesIO()
    torch.save(d, buf)
    tree[entry] = buf.getvalue()
    import hashlib

    tree[side] = json.dumps({"format_version": 1, "sha256": hashlib.sha256(tree[entry]).hexdigest(),
                             "bytes": len(tree[entry])}).encode()
    return Case(tree, f"content:{what}", False, ())


def test_fuzz_decode_cache(tmp_path, tmp_path_factory):
    """A damaged decode-cache entry is never served: the images are decoded again (and the entry
    rewritten), or a planted unsafe entry is refused naming it; the result equals a fresh decode."""
    from lightning_dd.data.readers import read_class_folders

    fresh, entries = _cache_base(tmp_path_factory)
    marker = tmp_path / "PWNED"

    def same(out, case):
        for k in ("train_images", "train_labels", "test_images", "test_labels"):
            assert torch.equal(getattr(out, k), getattr(fresh, k)), f"{k} differ from a fresh decode"
        assert out.classes == fresh.classes, f"classes {out.classes}"

    @FUZZ
    @given(_cache_case(entries, marker))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            _pin_mtimes(work / "cf")
            run_case("decode_cache", case, lambda: read_class_folders(work / "cf", cache_dir=work / "cache", workers=1),
                     work, (ValueError,), same, marker=marker)
            if not case.must_fail:  # the entry is whole again: a second read serves it unchanged
                run_case("decode_cache", Case(case.tree, "reread", False, ()),
                         lambda: read_class_folders(work / "cf", cache_dir=work / "cache", workers=1), work,
                         (ValueError,), same)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("decode_cache")


# =================================================================== artifacts: distilled.pt, condensed.pt
def _distilled():
    from lightning_dd.results import DistilledSet

    g = torch.Generator().manual_seed(0)
    return DistilledSet(images=torch.randn(6, 1, 4, 4, generator=g), labels=torch.arange(3).repeat(2), lr=0.01,
                        classes=["a", "b", "c"], preprocessing={"mean": torch.zeros(1), "std": torch.ones(1)},
                        method="dm", ipc=2, meta={"iterations": 5, "hard_labels": torch.arange(3).repeat(2)})


def _artifact_bytes(d) -> bytes:
    buf = io.BytesIO()
    torch.save(d, buf)
    return buf.getvalue()


def _distilled_dict():
    from dataclasses import asdict

    return {"format_version": 1, **asdict(_distilled())}


ART_BASE = {"run/distilled.pt": _artifact_bytes(_distilled_dict())}


def _validate_distilled(out, case: Case):
    from lightning_dd.results import DistilledSet

    assert isinstance(out, DistilledSet)
    out.validate()
    assert out.images.dtype.is_floating_point and out.images.dim() == 4 and torch.isfinite(out.images).all()
    assert isinstance(out.classes, list) and all(isinstance(c, str) for c in out.classes), f"classes {out.classes!r}"
    assert isinstance(out.preprocessing, dict), f"preprocessing {type(out.preprocessing).__name__}"
    assert isinstance(out.meta, dict), f"meta {type(out.meta).__name__}"
    assert len(out.hard_labels()) == len(out.images)
    assert isinstance(out.method, str)


@st.composite
def _distilled_semantic(draw, marker):
    d = _distilled_dict()
    kind = draw(st.sampled_from(["crafted", "images", "labels", "lr", "classes", "preprocessing", "ipc", "meta",
                                 "missing", "version", "not_dict", "method", "valid_variant"]))
    must = True
    if kind == "crafted":
        where = draw(st.sampled_from(["top", "images", "meta", "preprocessing"]))
        payload = draw(st.sampled_from(exploits(marker)))
        d = payload if where == "top" else {**d, where: payload}
    elif kind == "images":
        d["images"] = draw(st.sampled_from([torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.zeros(6, 16),
                                            torch.full((6, 1, 4, 4), float("nan")), torch.zeros(5, 1, 4, 4),
                                            torch.zeros(6, 1, 4, 4, dtype=torch.complex64), "images", None,
                                            np.zeros((6, 1, 4, 4), np.float32).tolist()]))
    elif kind == "labels":
        d["labels"] = draw(st.sampled_from([torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([-1, 0, 1, 2, 0, 1]),
                                            torch.arange(6).float(), torch.arange(6, dtype=torch.int32) % 3,
                                            torch.zeros(6, 4), torch.full((6, 3), float("inf")), torch.zeros(6, 3, 1),
                                            torch.zeros(5, dtype=torch.long), [0, 1, 2, 0, 1, 2]]))
    elif kind == "lr":
        d["lr"] = draw(st.sampled_from([float("nan"), -1.0, 0.0, "0.01", torch.tensor([0.1, 0.2]), [0.01],
                                        float("inf"), True]))
    elif kind == "classes":
        d["classes"] = draw(st.sampled_from([["a", "b"], 3, "abc", [1, 2, 3], None, ["a", "b", None],
                                             {"a": 0, "b": 1, "c": 2}]))
    elif kind == "preprocessing":
        d["preprocessing"] = draw(st.sampled_from([5, "zca", None, [1, 2], {"mean": "x", "std": 1}]))
    elif kind == "ipc":
        d["ipc"] = draw(st.sampled_from([-1, "2", 2.5, None, torch.tensor(2)]))
    elif kind == "meta":
        d["meta"] = draw(st.sampled_from([5, "x", None, [1], {"hard_labels": torch.zeros(2, dtype=torch.long)},
                                          {"hard_labels": "abc"}]))
    elif kind == "missing":
        del d[draw(st.sampled_from(["images", "labels", "lr", "classes", "preprocessing"]))]
    elif kind == "version":
        d["format_version"] = draw(st.sampled_from([99, -1, "1", 1.5, None]))
    elif kind == "not_dict":
        d = draw(st.sampled_from([[1, 2], 3, "distilled", None, torch.zeros(3), (d["images"], d["labels"])]))
    elif kind == "method":
        d["method"] = draw(st.sampled_from([5, None, ["dm"]]))
    else:  # extra keys, soft labels, no lr, version 0 (no format_version): all load
        must = False
        if draw(st.booleans()):
            d["extra_key"] = torch.ones(2)
        if draw(st.booleans()):
            d["labels"] = torch.randn(6, 3)
            d["meta"] = {}
        if draw(st.booleans()):
            d["lr"] = None
        if draw(st.booleans()):
            del d["format_version"]
    return Case({"run/distilled.pt": _artifact_bytes(d)}, f"{kind}", must, ("distilled.pt",))




def test_fuzz_distilled_artifacts(tmp_path):
    from lightning_dd.results import DistilledSet

    marker = tmp_path / "PWNED"

    @FUZZ
    @given(st.one_of(byte_case(ART_BASE, binary=frozenset(ART_BASE)), _distilled_semantic(marker)))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            run_case("distilled_artifact", case, lambda: DistilledSet.load(work / "run" / "distilled.pt"), work,
                     (ValueError, FileNotFoundError), _validate_distilled, marker=marker)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("distilled_artifact")


def _condensed_dict():
    from dataclasses import asdict

    from lightning_dd.results import CondensedGraph

    a = torch.tensor([[0.0, 1, 0], [1, 0, 0.5], [0, 0.5, 0]])
    return {"format_version": 1, "kind": "condensed_graph",
            **asdict(CondensedGraph(torch.randn(3, 4), a, torch.tensor([0, 1, 1]), "gcond", 0.5, {"k": 1}))}


CG_BASE = {"run/condensed.pt": _artifact_bytes(_condensed_dict())}


def _validate_condensed(out, case: Case):
    out.validate()
    n = out.x.shape[0]
    assert out.x.dim() == 2 and out.adj.shape == (n, n) and out.y.shape == (n,) and torch.isfinite(out.x).all()
    assert isinstance(out.meta, dict)


@st.composite
def _condensed_semantic(draw, marker):
    d = _condensed_dict()
    kind = draw(st.sampled_from(["crafted", "x", "adj", "y", "missing", "meta", "valid_variant"]))
    must = True
    if kind == "crafted":
        d = {**d, draw(st.sampled_from(["x", "meta"])): draw(st.sampled_from(exploits(marker)))}
    elif kind == "x":
        d["x"] = draw(st.sampled_from([torch.zeros(3), torch.full((3, 4), float("nan")), torch.zeros(3, 4).long(),
                                       torch.zeros(2, 4), "x", None, torch.tensor(1.0)]))
    elif kind == "adj":
        d["adj"] = draw(st.sampled_from([torch.zeros(3, 2), -torch.ones(3, 3), torch.eye(3), torch.rand(3, 3) + 2,
                                         torch.full((3, 3), float("inf")), "adj", torch.zeros(3, 3).long()]))
    elif kind == "y":
        d["y"] = draw(st.sampled_from([torch.tensor([0, -1, 1]), torch.tensor([0.0, 1, 1]), torch.zeros(2).long(),
                                       [0, 1, 1], torch.zeros(3, 1).long()]))
    elif kind == "missing":
        del d[draw(st.sampled_from(["x", "adj", "y"]))]
    elif kind == "meta":
        d["meta"] = draw(st.sampled_from([5, "m", None, [1]]))
    else:
        must = False
        d["extra"] = 1
    return Case({"run/condensed.pt": _artifact_bytes(d)}, kind, must, ("condensed.pt",))


def test_fuzz_condensed_artifacts(tmp_path):
    from lightning_dd.results import CondensedGraph

    marker = tmp_path / "PWNED"

    @FUZZ
    @given(st.one_of(byte_case(CG_BASE, binary=frozenset(CG_BASE)), _condensed_semantic(marker)))
    def fuzz(case):
        work = fresh_dir(tmp_path)
        try:
            write_tree(work, case.tree)
            run_case("condensed_artifact", case, lambda: CondensedGraph.load(work / "run" / "condensed.pt"), work,
                     (ValueError, FileNotFoundError), _validate_condensed, marker=marker)
        finally:
            cleanup(work)

    fuzz()
    assert_reader_clean("condensed_artifact")


# =================================================================== one crafted pickle, every loader
def _crafted_trees(marker) -> dict:
    payload = exploits(marker)[0]  # os.system("touch <marker>")
    obj_arr = np.empty(1, dtype=object)
    obj_arr[0] = payload
    cached = io.BytesIO()
    torch.save({"train_images": payload}, cached)
    return {
        "cifar": ({**CIFAR_BASE, f"{CIFAR_DIR}/data_batch_1": pickle.dumps({b"data": payload, b"labels": [0]})},
                  "refused to unpickle posix.system"),
        "planetoid": ({**PL_BASE, "pl/raw/ind.cora.graph": pickle.dumps({0: payload})}, "refused to unpickle posix"),
        "point_npz": ({**PV_BASE, "pv/a01_s01_e01_sdepth.npz": npz_bytes_pickled(point_clouds=obj_arr)},
                      "allow_pickle"),
        "distilled": ({"run/distilled.pt": _artifact_bytes({**_distilled_dict(), "meta": payload})},
                      "never unpickles"),
        "condensed": ({"run/condensed.pt": _artifact_bytes({**_condensed_dict(), "x": payload})}, "never unpickles"),
    }


@pytest.mark.parametrize("loader", ["cifar", "planetoid", "point_npz", "distilled", "condensed"])
def test_a_crafted_pickle_is_refused_by_every_loader(tmp_path, loader):
    """A file whose unpickling would run ``os.system`` is refused with a message naming the file and
    the object, and nothing runs (the marker file it would create stays absent)."""
    from lightning_dd.data.graphs import read_planetoid
    from lightning_dd.data.point_video import read_point_video
    from lightning_dd.data.readers import read_cifar
    from lightning_dd.results import CondensedGraph, DistilledSet

    marker = tmp_path / "PWNED"
    tree, expect = _crafted_trees(marker)[loader]
    write_tree(tmp_path, tree)
    call, name = {"cifar": (lambda: read_cifar(tmp_path / "cifar10"), "data_batch_1"),
                  "planetoid": (lambda: read_planetoid(tmp_path / "pl", "cora"), "ind.cora.graph"),
                  "point_npz": (lambda: read_point_video(tmp_path / "pv" / "a01_s01_e01_sdepth.npz"),
                                "a01_s01_e01_sdepth.npz"),
                  "distilled": (lambda: DistilledSet.load(tmp_path / "run" / "distilled.pt"), "distilled.pt"),
                  "condensed": (lambda: CondensedGraph.load(tmp_path / "run" / "condensed.pt"), "condensed.pt")}[loader]
    with pytest.raises(ValueError, match=expect) as e:
        call()
    assert name in str(e.value)
    assert not marker.exists(), "the crafted pickle ran"
