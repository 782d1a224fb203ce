"""ImageNet / Tiny-ImageNet loading on real JPEGs (../shared/data/imagenet_sample, which has
grayscale files), CMYK conversion, layouts, decode cache, streaming transforms, missing files."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dd.data.imagenet import (ImageNetDataModule, decode_resized, detect_layout, image_folder_dataset,
                                        list_files, memory_estimate)
from lightning_dd.data.readers import DataNotFoundError


@pytest.fixture(scope="module")
def sample(shared_data) -> Path:
    root = shared_data / "imagenet_sample"
    if not root.is_dir():
        pytest.fail(f"real ImageNet sample not found at {root}")
    return root


def test_shared_sample_decodes_to_rgb_224_with_grayscale_files(sample, cache_dir):
    classes, files = list_files(sample, "auto", "train")
    assert detect_layout(sample) == "flat" and len(classes) == 105 and len(files) == 105
    gray = [i for i, (f, _) in enumerate(files) if Image.open(f).mode == "L"]
    assert len(gray) >= 5  # the sample's README: 5 grayscale JPEGs
    dm = ImageNetDataModule(str(sample), layout="auto", cache_dir=str(cache_dir))
    raw = dm.read()
    assert raw.train_images.shape == (105, 3, 224, 224) and raw.train_images.dtype == torch.uint8
    assert raw.train_labels.tolist() == list(range(105)) and raw.classes == sorted(raw.classes)
    g = raw.train_images[gray]
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])  # L -> RGB replicates the channel
    color = [i for i in range(105) if i not in gray][:5]
    assert not torch.equal(raw.train_images[color][:, 0], raw.train_images[color][:, 1])
    dm.setup()  # model space with the ImageNet mean/std, val = train for the flat layout
    assert dm.num_classes == 105 and dm.test_images.shape == dm.train_images.shape
    assert torch.allclose(dm.preprocessing.mean, torch.tensor([0.485, 0.456, 0.406]))
    assert -2.2 < float(dm.train_images.min()) and float(dm.train_images.max()) < 2.7


def test_decode_cache_is_reused_and_keyed_by_size(sample, tmp_path):
    dm = ImageNetDataModule(str(sample), image_size=32, resize_size=36, cache_dir=str(tmp_path))
    a = dm.read()
    files = list((tmp_path / "decoded").glob("*.pt"))
    assert len(files) == 1
    b = ImageNetDataModule(str(sample), image_size=32, resize_size=36, cache_dir=str(tmp_path)).read()
    assert torch.equal(a.train_images, b.train_images)
    ImageNetDataModule(str(sample), image_size=32, resize_size=40, cache_dir=str(tmp_path)).read()
    assert len(list((tmp_path / "decoded").glob("*.pt"))) == 2  # another resize -> another cache entry


def _copy_some(sample: Path, n: int) -> list[Path]:
    return [sorted(d.iterdir())[0] for d in sorted(p for p in sample.iterdir() if p.is_dir())[:n]]


def test_cmyk_and_varied_sizes_in_the_imagenet_layout(sample, tmp_path):
    srcs = _copy_some(sample, 3)
    for split in ("train", "val"):
        for s in srcs:
            d = tmp_path / split / s.parent.name
            d.mkdir(parents=True)
            im = Image.open(s).convert("RGB")
            im.save(d / "rgb.JPEG")
            if split == "train":  # a CMYK JPEG and a small palette PNG of the same picture
                im.convert("CMYK").save(d / "cmyk.JPEG")
                im.resize((50, 37)).convert("P").save(d / "small.png")
    classes, train = list_files(tmp_path, "auto", "train")
    assert detect_layout(tmp_path) == "imagenet" and len(train) == 9 and len(classes) == 3
    rgb = decode_resized(tmp_path / "train" / srcs[0].parent.name / "rgb.JPEG", 64, 73)
    cmyk = decode_resized(tmp_path / "train" / srcs[0].parent.name / "cmyk.JPEG", 64, 73)
    small = decode_resized(tmp_path / "train" / srcs[0].parent.name / "small.png", 64, 73)
    assert rgb.shape == cmyk.shape == small.shape == (64, 64, 3)
    assert np.abs(rgb.astype(int) - cmyk.astype(int)).mean() < 12  # same picture after CMYK -> RGB
    dm = ImageNetDataModule(str(tmp_path), image_size=64, resize_size=73, val_per_class=1)
    dm.setup()
    assert dm.train_images.shape == (9, 3, 64, 64) and dm.test_images.shape == (3, 3, 64, 64)


def test_tiny_imagenet_layout(sample, tmp_path):
    srcs = _copy_some(sample, 2)
    (tmp_path / "val" / "images").mkdir(parents=True)
    lines = []
    for i, s in enumerate(srcs):
        d = tmp_path / "train" / s.parent.name / "images"
        d.mkdir(parents=True)
        Image.open(s).convert("RGB").resize((64, 64)).save(d / f"{s.parent.name}_0.JPEG")
        Image.open(s).convert("RGB").resize((64, 64)).save(tmp_path / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{s.parent.name}\t0\t0\t63\t63")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(reversed(lines)) + "\n")
    assert detect_layout(tmp_path) == "tiny"
    dm = ImageNetDataModule(str(tmp_path), name="tiny_imagenet", image_size=64, resize_size=64)
    dm.setup()
    assert dm.train_images.shape == (2, 3, 64, 64) and dm.test_labels.tolist() == [0, 1]


def test_missing_data_names_the_expected_files(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"train/<wnid>/\*\.JPEG"):
        ImageNetDataModule(str(tmp_path / "imagenet")).setup()
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DataNotFoundError, match="no train images"):
        ImageNetDataModule(str(tmp_path / "empty")).setup()
    with pytest.raises(ValueError, match="layout"):
        ImageNetDataModule(str(tmp_path), layout="coco")


def test_streaming_dataset_standard_transforms_on_grayscale(sample):
    ds = image_folder_dataset(sample, "train", "flat", image_size=224)
    gray = next(i for i, (f, _) in enumerate(ds.files) if Image.open(f).mode == "L")
    torch.manual_seed(0)
    x, y = ds[gray]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == ds.files[gray][1]
    val = image_folder_dataset(sample, "val", "flat", image_size=224, resize_size=256)
    a, _ = val[0]
    b, _ = val[0]
    assert torch.equal(a, b)  # the evaluation transform is deterministic


def test_memory_estimate_matches_imagenet_sizes():
    full = memory_estimate(1_281_167, 50_000, 224)
    assert 715 < full["train_held"] < 725  # all of ImageNet-1k's training images as float32: ~720 GiB
    assert full["train_held"] * 2 ** 30 / 1e9 == pytest.approx(771.4, abs=0.5)  # ~770 GB
    small = memory_estimate(10_000, 10_000, 224)
    assert small["held"] == pytest.approx(20_000 * 3 * 224 * 224 * 4 / 2 ** 30)
    assert small["peak"] == pytest.approx(22 * 10_000 * 3 * 224 * 224 / 2 ** 30)


def test_too_large_a_selection_fails_before_decoding(sample, tmp_path, monkeypatch):
    import lightning_dd.data.imagenet as inet

    def no_decode(*a, **k):
        raise AssertionError("decoded despite the memory limit")

    monkeypatch.setattr(inet, "decode_files", no_decode)
    dm = ImageNetDataModule(str(sample), layout="flat", cache_dir=str(tmp_path), max_memory_gib=0.1)
    with pytest.raises(ValueError, match=r"data\.train_per_class.*data\.val_per_class") as e:
        dm.setup()  # 105 + 105 images at 224 px: ~0.32 GiB at the peak of setup
    assert "0.3 GiB at the peak" in str(e.value) and "data.max_memory_gib=0.1" in str(e.value)
    assert not (tmp_path / "decoded").exists()
    small = ImageNetDataModule(str(sample), layout="flat", image_size=32, resize_size=36, max_memory_gib=0.1)
    monkeypatch.undo()
    small.setup()  # 32 px fits the same limit
    assert small.train_images.shape == (105, 3, 32, 32)


def test_imagenet_experiments_fit_their_memory_limit():
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    for name in ("cda_imagenet", "sre2l_imagenet"):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            d = compose("train", overrides=[f"experiment={name}"]).data
        assert d.train_per_class is not None and d.val_per_class is not None
        est = memory_estimate(1000 * d.train_per_class, 1000 * d.val_per_class, d.image_size)
        assert est["peak"] <= d.max_memory_gib
