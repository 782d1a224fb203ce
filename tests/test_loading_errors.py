"""Saved results, coreset index files and image files that are wrong are refused with a message
naming the file (and the line for text files); artifacts load with ``weights_only=True``."""
import pathlib
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_dd.data.imagenet import ImageFileDataset, decode_files
from lightning_dd.data.readers import read_class_folders
from lightning_dd.evaluate_run import _read_indices, load_result
from lightning_dd.io import load_dict, safe_load
from lightning_dd.results import CondensedGraph, DistilledSet

CLASSES = [str(i) for i in range(10)]


def _set(lr=0.01, **kw) -> DistilledSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 8, 8, generator=g)
    y = torch.arange(10).repeat_interleave(2)
    d = dict(images=x, labels=y, lr=lr, classes=CLASSES, preprocessing={"mean": torch.zeros(1), "std": torch.ones(1)},
             method="dm", ipc=2, meta={"iterations": 5, "data": {"name": "digits", "train_per_class": None},
                                       "net": {"name": "ConvNet", "width": 128, "dims": [1, 2]},
                                       "hard_labels": y.clone(), "note": "text"})
    d.update(kw)
    return DistilledSet(**d)


def _raw_save(result: DistilledSet, path):
    """Write without validation (what a buggy or foreign writer could leave)."""
    torch.save({"format_version": 1, **asdict(result)}, path)
    return path


def _dm(n=50):
    return SimpleNamespace(train_labels=torch.arange(n) % 10, train_images=torch.randn(n, 1, 8, 8), classes=CLASSES,
                           preprocessing=SimpleNamespace(state=lambda: {}))


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.01, 0.0, torch.tensor(float("nan"))])
def test_result_with_bad_lr_is_refused(tmp_path, lr):
    p = _raw_save(_set(lr=lr), tmp_path / "distilled.pt")
    with pytest.raises(ValueError, match=r"distilled\.pt.*lr must be None or a finite number > 0"):
        load_result(p)
    with pytest.raises(ValueError, match="lr must be"):
        _set(lr=lr).save(tmp_path / "again.pt")  # never written either


def test_result_with_non_finite_images_or_soft_labels_is_refused(tmp_path):
    x = _set().images.clone()
    x[3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"distilled\.pt: images contain 1 NaN/inf"):
        load_result(_raw_save(_set(images=x), tmp_path / "distilled.pt"))
    soft = torch.randn(20, 10)
    soft[0, 0] = float("inf")
    with pytest.raises(ValueError, match="soft labels contain NaN or inf"):
        DistilledSet.load(_raw_save(_set(labels=soft), tmp_path / "soft.pt"))


def test_valid_result_round_trips_with_weights_only(tmp_path):
    r = _set(lr=torch.tensor(0.02))
    r.save(tmp_path / "distilled.pt")
    raw = torch.load(tmp_path / "distilled.pt", weights_only=True)  # what the framework writes is allowlisted
    assert raw["meta"]["net"]["dims"] == [1, 2]
    back = load_result(tmp_path)  # a run directory works too
    assert torch.equal(back.images, r.images) and back.meta["note"] == "text" and back.ipc == 2
    assert float(back.lr) == pytest.approx(0.02)
    assert load_result(tmp_path, _dm()).method == "dm"  # a distilled set is recognized before any coreset reading
    g = CondensedGraph(torch.randn(4, 3), torch.zeros(4, 4), torch.tensor([0, 1, 0, 1]), "gcond", 0.5,
                       meta={"data": {"name": "cora"}, "method_cfg": {"setting": "transductive", "nlayers": 2}})
    g.save(tmp_path / "condensed.pt")
    assert CondensedGraph.load(tmp_path / "condensed.pt").meta["method_cfg"]["nlayers"] == 2


def test_pickled_objects_are_never_unpickled(tmp_path):
    p = tmp_path / "distilled.pt"
    d = {"format_version": 1, **asdict(_set())}
    d["meta"]["where"] = pathlib.PurePosixPath("/x")  # any non-allowlisted object
    torch.save(d, p)
    with pytest.raises(ValueError, match=r"distilled\.pt: not loaded: .*PurePosixPath.*never unpickles"):
        load_result(p)
    with pytest.raises(ValueError, match="never unpickles"):
        load_dict(p, ("images",), "distilled set")
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable torch file"):
        safe_load(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_dict(tmp_path / "missing.pt", ("images",), "distilled set")


def test_coreset_with_duplicate_indices_is_refused(tmp_path):
    (tmp_path / "idx.txt").write_text("0\n0\n0\n")
    with pytest.raises(ValueError, match=r"idx\.txt: 1 indices appear more than once: 0 \(x3\)"):
        load_result(tmp_path / "idx.txt", _dm())
    np.save(tmp_path / "idx.npy", np.array([4, 7, 4, 9, 7]))
    with pytest.raises(ValueError, match=r"idx\.npy: 2 indices .*4 \(x2\), 7 \(x2\)"):
        _read_indices(tmp_path / "idx.npy")
    torch.save({"indices": torch.tensor([1, 1])}, tmp_path / "idx.pt")
    with pytest.raises(ValueError, match=r"idx\.pt: 1 indices appear more than once"):
        load_result(tmp_path / "idx.pt", _dm())


def test_coreset_text_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "coreset.txt"
    p.write_text("12\nabc\n")
    with pytest.raises(ValueError) as e:
        load_result(p, _dm())
    assert str(p) in str(e.value) and "line 2" in str(e.value) and "'abc'" in str(e.value)
    p.write_text("# chosen by herding\n3\n\n5  # a comment\n17\n")
    r = load_result(p, _dm())
    assert r.labels.tolist() == [3, 5, 7] and r.ipc == 1 and r.method == "coreset:coreset.txt"
    np.save(tmp_path / "f.npy", np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"f\.npy: expected a 1-D integer tensor"):
        _read_indices(tmp_path / "f.npy")


def _jpeg_tree(root, n_per_class=2, size=8):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i:04d}.jpg", quality=95)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_jpeg_in_class_folders_names_the_file(tmp_path):
    _jpeg_tree(tmp_path / "ds", size=32)
    assert read_class_folders(tmp_path / "ds").train_images.shape == (4, 3, 32, 32)
    bad = tmp_path / "ds" / "train" / "dog" / "0001.jpg"
    _truncate(bad)
    with pytest.raises(OSError, match="truncated") as e:
        read_class_folders(tmp_path / "ds")
    assert str(bad) in str(e.value)
    (tmp_path / "ds" / "train" / "cat" / "0000.jpg").write_bytes(b"not an image at all")
    with pytest.raises(OSError, match=r"cat/0000\.jpg"):
        read_class_folders(tmp_path / "ds")


def test_class_folders_of_different_sizes_name_a_file(tmp_path):
    from PIL import Image

    _jpeg_tree(tmp_path / "ds", size=32)
    odd = tmp_path / "ds" / "test" / "cat" / "0001.jpg"
    Image.new("RGB", (40, 30)).save(odd)
    with pytest.raises(ValueError, match=r"different sizes: 3 of 32x32 .*1 of 40x30 \(e\.g\. .*cat/0001\.jpg\)"):
        read_class_folders(tmp_path / "ds")


def test_imagenet_decoders_name_a_truncated_file(tmp_path):
    from lightning_dd.data.imagenet import val_transforms

    _jpeg_tree(tmp_path / "ds", size=48)
    files = [(f, 0) for f in sorted((tmp_path / "ds" / "train" / "cat").iterdir())]
    assert decode_files(files, 16, 16, workers=1)[0].shape == (2, 3, 16, 16)
    _truncate(files[1][0])
    with pytest.raises(OSError) as e:
        decode_files(files, 16, 16, workers=1)
    assert str(files[1][0]) in str(e.value) and "truncated" in str(e.value)
    ds = ImageFileDataset(files, val_transforms(16, 16))
    assert ds[0][0].shape == (3, 16, 16)
    with pytest.raises(OSError) as e:
        ds[1]
    assert str(files[1][0]) in str(e.value)
