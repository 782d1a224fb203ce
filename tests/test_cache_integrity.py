"""Cache entries are written atomically with a SHA-256 sidecar; a truncated or corrupted entry is
detected, reported (a warning naming the file), deleted and rebuilt -- never used -- through the
real cache functions on tiny data: expert trajectories, the ZCA preprocessing, decoded images,
real-data statistics and squeezed teachers."""
import hashlib
import json
import logging
import struct
import zipfile

import pytest
import torch
from PIL import Image

from lightning_dd.data import DigitsDataModule
from lightning_dd.data.readers import read_class_folders
from lightning_dd.io import CACHE_FORMAT_VERSION, load_cache, save_cache, sidecar
from lightning_dd.methods.images.experts import ExpertBank
from lightning_dd.nets import build_net
from configs import CountingTrainerFactory, method


def truncate(path):
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def flip_byte(path):
    """One flipped byte in the middle of the largest tensor's data: torch still loads such a file,
    with a wrong number -- only the checksum can tell."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    b = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", b[info.header_offset + 26: info.header_offset + 30])
    b[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(b))


CORRUPTIONS = {"truncated": truncate, "flipped_byte": flip_byte}


def assert_reported(caplog, path):
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in m and "deleted, it will be rebuilt" in m for m in msgs), msgs
    caplog.clear()


def test_save_cache_writes_a_checksum_sidecar_and_load_cache_verifies_it(tmp_path, caplog):
    p = tmp_path / "e.pt"
    obj = {"x": torch.arange(1000.0), "s": "text"}
    save_cache(obj, p)
    meta = json.loads(sidecar(p).read_text())
    assert meta == {"format_version": CACHE_FORMAT_VERSION, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                    "bytes": p.stat().st_size}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    back = load_cache(p)
    assert torch.equal(back["x"], obj["x"]) and back["s"] == "text"
    flip_byte(p)
    assert torch.load(p, weights_only=True)["x"].shape == (1000,)  # torch would happily use it
    with caplog.at_level(logging.WARNING):
        assert load_cache(p, "test entry") is None
    assert_reported(caplog, p)
    assert not p.exists() and not sidecar(p).exists()
    assert load_cache(p) is None  # missing stays missing, silently


def test_format_0_entries_are_used_and_upgraded_and_bad_sidecars_rebuild(tmp_path, caplog):
    p = tmp_path / "old.pt"
    torch.save({"x": torch.ones(3)}, p)  # what earlier versions wrote: no sidecar
    assert torch.equal(load_cache(p)["x"], torch.ones(3))
    assert json.loads(sidecar(p).read_text())["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    torch.save({"x": torch.ones(3)}, tmp_path / "t.pt")
    truncate(tmp_path / "t.pt")
    with caplog.at_level(logging.WARNING):
        assert load_cache(tmp_path / "t.pt") is None  # format 0 and truncated: torch cannot read it
    assert_reported(caplog, tmp_path / "t.pt")
    for bad in ("not json", json.dumps({"format_version": CACHE_FORMAT_VERSION + 1, "sha256": "", "bytes": 0})):
        save_cache({"x": 1}, p)
        sidecar(p).write_text(bad)
        with caplog.at_level(logging.WARNING):
            assert load_cache(p) is None
        assert_reported(caplog, p)
    save_cache({"x": 1}, p)
    with caplog.at_level(logging.WARNING):
        assert load_cache(p, check=lambda d: d["y"]) is None  # wrong structure (KeyError)
    assert_reported(caplog, p)


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupted_expert_trajectory_is_retrained(tmp_path, caplog, corrupt):
    made = CountingTrainerFactory(accelerator="cpu", enable_progress_bar=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 2
    bank = ExpertBank(tmp_path / "experts", {"data": "toy"}, {"name": "ConvNet", "width": 4, "depth": 1}, 0.01, 2,
                      batch_size=8, make_trainer=made)
    first = bank.ensure(2, x, y, 2)
    assert len(made.stages) == 2 and sidecar(bank.path(1)).is_file()
    assert len(bank.ensure(2, x, y, 2)) == 2 and len(made.stages) == 2  # cached: nothing trained
    CORRUPTIONS[corrupt](bank.path(1))
    with caplog.at_level(logging.WARNING):
        again = bank.ensure(2, x, y, 2)
    assert_reported(caplog, bank.path(1))
    assert len(made.stages) == 3  # expert 1 retrained, expert 0 reused
    assert torch.equal(again[0]["trajectory"], first[0]["trajectory"])
    assert torch.allclose(again[1]["trajectory"], first[1]["trajectory"])  # same seed: the same expert
    assert load_cache(bank.path(1)) is not None  # and a valid entry again


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupted_zca_preprocessing_is_refitted(tmp_path, caplog, corrupt):
    dm = DigitsDataModule(zca=True, cache_dir=str(tmp_path))
    dm.setup()
    (entry,) = (tmp_path / "preprocessing").glob("*.pt")
    assert sidecar(entry).is_file()
    CORRUPTIONS[corrupt](entry)
    again = DigitsDataModule(zca=True, cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        again.setup()
    assert_reported(caplog, entry)
    assert torch.allclose(again.preprocessing.zca, dm.preprocessing.zca, atol=1e-6)
    assert torch.allclose(again.train_images, dm.train_images, atol=1e-5)
    assert load_cache(entry) is not None


def _png_tree(root, n=3, size=6):
    g = torch.Generator().manual_seed(1)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(a).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupted_decoded_images_are_decoded_again(tmp_path, caplog, corrupt):
    root = _png_tree(tmp_path / "toy")
    first = read_class_folders(root, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "decoded").glob("*.pt")
    CORRUPTIONS[corrupt](entry)
    with caplog.at_level(logging.WARNING):
        again = read_class_folders(root, cache_dir=tmp_path / "cache")
    assert_reported(caplog, entry)
    assert torch.equal(again.train_images, first.train_images) and again.classes == ["cat", "dog"]
    assert torch.equal(again.test_labels, first.test_labels)
    assert load_cache(entry) is not None


def test_corrupted_real_statistics_are_recomputed(tmp_path, caplog):
    from types import SimpleNamespace

    from lightning_dd.methods.images.statistics_matching import real_statistics

    torch.manual_seed(0)
    net = build_net("ConvNet", 3, 4, (16, 16), width=8, depth=2, norm="batchnorm").eval()
    path = tmp_path / "teacher.pt"
    torch.save({"net_cfg": {}, "state_dict": net.state_dict()}, path)
    dm = SimpleNamespace(train_images=torch.randn(30, 3, 16, 16), train_labels=torch.arange(30) % 4, num_classes=4,
                         identity=lambda: {"name": "toy"})
    conv, logits = real_statistics({"net": net, "path": path}, dm)
    (entry,) = tmp_path.glob("real_stats-*.pt")
    flip_byte(entry)
    with caplog.at_level(logging.WARNING):
        conv2, logits2 = real_statistics({"net": net, "path": path}, dm)
    assert_reported(caplog, entry)
    assert torch.allclose(logits2, logits) and all(torch.allclose(a[1], b[1]) for a, b in zip(conv, conv2))


def test_corrupted_teacher_is_trained_again(tmp_path, caplog):
    from lightning_dd.methods.images.statistics_matching import squeeze

    dm = DigitsDataModule(train_per_class=10)
    dm.setup()
    short = {"epochs": 1, "optimizer.lr": 0.05, "batch_size": 32, "optimizer.weight_decay": 0.0, "label_smoothing": 0.0}
    tcfg = method("sre2l", **{f"teacher.{k}": v for k, v in short.items()}).teacher
    net_cfg = {"name": "ConvNet", "width": 4, "depth": 1, "norm": "batchnorm"}
    made = CountingTrainerFactory(accelerator="cpu", enable_progress_bar=False)
    a = squeeze(net_cfg, dm, tcfg, tmp_path, trainer=made)
    truncate(a["path"])
    with caplog.at_level(logging.WARNING):
        b = squeeze(net_cfg, dm, tcfg, tmp_path, trainer=made)
    assert_reported(caplog, a["path"])
    assert not b["cached"] and len(made.stages) == 2 and squeeze(net_cfg, dm, tcfg, tmp_path, trainer=made)["cached"]
