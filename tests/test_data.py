"""Loaders read the real files, the original pickle format, and fail clearly when data is missing."""
import pickle

import numpy as np
import pytest
import torch

from lightning_dd.data import CIFARDataModule, DataNotFoundError, DigitsDataModule, read_cifar, read_class_folders

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_real_cifar10_folder_layout(shared_data, cache_dir):
    s = read_class_folders(shared_data / "cifar10", cache_dir=cache_dir)
    assert s.train_images.shape == (50000, 3, 32, 32) and s.train_images.dtype == torch.uint8
    assert s.test_images.shape == (10000, 3, 32, 32)
    assert s.classes == CIFAR10_CLASSES
    assert torch.bincount(s.train_labels).tolist() == [5000] * 10
    assert torch.bincount(s.test_labels).tolist() == [1000] * 10
    # a known file decodes to the same pixels as PIL reads it (airplane/0000.jpg is the first image)
    from PIL import Image

    ref = np.asarray(Image.open(shared_data / "cifar10" / "train" / "airplane" / "0000.jpg").convert("RGB"))
    assert torch.equal(s.train_images[0].permute(1, 2, 0), torch.from_numpy(ref))
    # the cache returns the same tensors
    s2 = read_class_folders(shared_data / "cifar10", cache_dir=cache_dir)
    assert torch.equal(s2.train_images, s.train_images) and torch.equal(s2.test_labels, s.test_labels)


def _write_pickles(root, name, n_train_batches, per_batch, n_classes, rng):
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for f in files:
            with open(base / f, "wb") as fh:
                pickle.dump({"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                             "labels": rng.integers(0, n_classes, per_batch).tolist(), "batch_label": f}, fh)
        with open(base / "batches.meta", "wb") as fh:
            pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch}, fh)
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        for f in ("train", "test"):
            with open(base / f, "wb") as fh:
                pickle.dump({"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                             "fine_labels": rng.integers(0, n_classes, per_batch).tolist(),
                             "coarse_labels": [0] * per_batch}, fh)
        with open(base / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}, fh)
    return base


def test_cifar10_pickle_format(tmp_path):
    rng = np.random.default_rng(0)
    base = _write_pickles(tmp_path, "cifar10", 5, 7, 10, rng)
    s = read_cifar(tmp_path, "cifar10")
    assert s.train_images.shape == (35, 3, 32, 32) and s.test_images.shape == (7, 3, 32, 32)
    assert s.classes == CIFAR10_CLASSES
    with open(base / "data_batch_1", "rb") as fh:
        d = pickle.load(fh)
    # row-major 3072 = 3 channel planes of 32x32
    assert torch.equal(s.train_images[0], torch.from_numpy(d["data"][0].reshape(3, 32, 32)))
    assert s.train_labels[:7].tolist() == d["labels"]


def test_cifar100_pickle_format(tmp_path):
    _write_pickles(tmp_path, "cifar100", 1, 9, 100, np.random.default_rng(1))
    dm = CIFARDataModule(root=str(tmp_path), name="cifar100")
    dm.setup()
    assert dm.train_images.shape == (9, 3, 32, 32) and dm.num_classes == 100
    assert dm.train_images.dtype == torch.float32


def test_missing_data_dir_names_expected_files(tmp_path):
    dm = CIFARDataModule(root=str(tmp_path / "nowhere" / "cifar10"))
    with pytest.raises(DataNotFoundError) as e:
        dm.setup()
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "train/<class>" in msg
    assert "LDD_DATA_DIR" in msg and "data.download=true" in msg


def test_missing_data_dir_fails_a_run_naming_the_files(tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from lightning_dd.runner import run

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=datm_cifar10", f"paths.data_dir={tmp_path}",
                                          f"paths.output_dir={tmp_path / 'run'}", "logger.wandb.enabled=false"])
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        run(cfg)
    assert not (tmp_path / "run" / "distilled.pt").exists()


def test_zca_roundtrip_and_whitening(shared_data, cache_dir):
    dm = CIFARDataModule(root=str(shared_data / "cifar10"), zca=True, train_per_class=100, cache_dir=str(cache_dir))
    dm.setup()
    assert dm.train_images.shape == (1000, 3, 32, 32)
    assert torch.bincount(dm.train_labels).tolist() == [100] * 10
    back = dm.preprocessing.inverse(dm.train_images[:5])
    s = read_class_folders(shared_data / "cifar10", cache_dir=cache_dir)
    # inverse(ZCA(x)) recovers [0,1] pixels of some real training images
    assert back.min() > -1e-3 and back.max() < 1 + 1e-3
    fwd = dm.preprocessing.forward(back)
    assert torch.allclose(fwd, dm.train_images[:5], atol=1e-3)
    # whitening decorrelates: off-diagonal covariance is far smaller than raw pixels'
    z = dm.train_images.reshape(1000, -1)[:, :64]
    c = torch.corrcoef(z.T).abs()
    raw = torch.corrcoef((s.train_images[:1000].float().reshape(1000, -1)[:, :64]).T).abs()
    off = ~torch.eye(64, dtype=bool)
    assert c[off].mean() < 0.5 * raw[off].mean()


def test_digits_split_is_stratified_and_fixed():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    assert a.train_images.shape[1:] == (1, 8, 8)
    assert len(a.train_labels) + len(a.test_labels) == 1797
    assert torch.equal(a.test_labels, b.test_labels)
    assert torch.bincount(a.train_labels).min() >= 120


def test_train_offsets_give_disjoint_parts_of_the_same_permutation():
    """Offsets 0 and train_per_class take disjoint images of every class (a teacher and a student
    on different halves); offset 0 keeps the earlier subset (and cache key) unchanged."""
    labels = DigitsDataModule().read().train_labels

    def part(offset, per_class=40):
        dm = DigitsDataModule(train_per_class=per_class, train_offset_per_class=offset)
        return dm, set(dm._subset(labels).tolist())

    (a, ia), (b, ib), (_, iab) = part(0), part(40), part(0, 80)
    old = DigitsDataModule(train_per_class=40)
    assert ia == set(old._subset(labels).tolist()) and a.identity() == old.identity() != b.identity()
    assert torch.bincount(labels[sorted(ib)]).tolist() == [40] * 10
    assert not ia & ib and ia | ib == iab
    b.setup()
    assert len(b.train_labels) == 400
    with pytest.raises(ValueError, match="train_offset_per_class=200 but class 0 has"):
        part(200)
