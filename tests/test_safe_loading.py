"""Safe loading (issue 17): a crafted pickle whose loading would run code is refused by every
loader -- result artifacts (``DistilledSet.load``, evaluate.py's ``load_result``, ``CondensedGraph``),
teacher files, the expert bank, every cache read and the resume checkpoints -- with a message naming
the file, and the code never runs; files in the current format load unchanged; old ones (format 0)
still load; newer ones are refused clearly."""
import os
import pickle
import subprocess
import sys
from dataclasses import asdict

import lightning as L
import pytest
import torch

from configs import CountingTrainerFactory, node
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data.readers import ImageSet
from lightning_dd.evaluate_run import load_result
from lightning_dd.io import (UnsafeFileError, check_checkpoint, load_cache, load_dict, safe_fit_kwargs, safe_load,
                             save_cache, sidecar)
from lightning_dd.methods.images.experts import ExpertBank
from lightning_dd.nets import build_net, load_net_file
from lightning_dd.results import FORMAT_VERSION, CondensedGraph, DistilledSet

CPU = CountingTrainerFactory(accelerator="cpu", enable_progress_bar=False)


class Payload:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "pwned"
    yield m
    assert not m.exists(), "the crafted pickle's code ran"


def _set() -> DistilledSet:
    g = torch.Generator().manual_seed(0)
    return DistilledSet(torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 0, 1]), 0.01, ["a", "b"],
                        {"mean": torch.zeros(1), "std": torch.ones(1)}, method="dm", ipc=2,
                        meta={"net": {"name": "ConvNet"}, "hard_labels": torch.tensor([0, 1, 0, 1])})


def _planted(path, marker, **fields):
    """A file that looks like the expected artifact but hides the payload in ``fields``."""
    torch.save({**fields, "hidden": Payload(marker)}, path)
    return path


def test_the_payload_is_real(tmp_path):
    """Sanity check of the test itself: an unrestricted ``pickle.load`` of the crafted file does run
    the code (in a subprocess), so the refusals below are not vacuous."""
    m = tmp_path / "ran"
    p = tmp_path / "raw.pkl"
    p.write_bytes(pickle.dumps({"x": Payload(m)}, protocol=2))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(p)!r}, 'rb'))"], check=True)
    assert m.exists()


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle_protocol2", "raw_pickle_protocol4"])
def test_result_loaders_refuse_a_crafted_pickle(tmp_path, marker, kind):
    p = tmp_path / "distilled.pt"
    fields = {"format_version": 1, **asdict(_set())}
    if kind == "torch_zip":
        _planted(p, marker, **fields)
    else:
        p.write_bytes(pickle.dumps({**fields, "hidden": Payload(marker)}, protocol=2 if "2" in kind else 4))
    for load in (DistilledSet.load, load_result, lambda q: load_dict(q, ("images",), "distilled set"),
                 lambda q: CondensedGraph.load(q)):
        with pytest.raises(ValueError, match=r"distilled\.pt: not (loaded|a readable torch file)") as e:
            load(p)
        if kind != "raw_pickle_protocol4":  # protocol 4 stops at its framing opcode, before any global
            assert isinstance(e.value, UnsafeFileError) and "never unpickles" in str(e.value)
        if kind == "torch_zip":  # a raw pickle names torch's own (also refused) tensor rebuilder first
            assert "posix.system" in str(e.value)


def test_teacher_files_and_index_files_refuse_a_crafted_pickle(tmp_path, marker):
    net = build_net("ConvNet", 1, 2, (8, 8), width=4, depth=1)
    p = _planted(tmp_path / "teacher.pt", marker, net_cfg={"name": "ConvNet", "width": 4, "depth": 1},
                 state_dict=net.state_dict())
    with pytest.raises(UnsafeFileError, match=r"teacher\.pt: not loaded: .*teacher checkpoint.*system"):
        load_net_file(p, 1, 2, (8, 8))
    with pytest.raises(UnsafeFileError, match=r"idx\.pt"):
        load_result(_planted(tmp_path / "idx.pt", marker, indices=torch.arange(3)), dm=object())


def test_cache_reads_refuse_a_crafted_pickle_and_keep_it(tmp_path, marker):
    """A planted cache entry (even with a matching checksum sidecar) is refused, not rebuilt over:
    it is kept for inspection."""
    from lightning_dd.io import _write_sidecar

    entry = tmp_path / "entry.pt"
    save_cache({"ok": torch.zeros(2)}, entry)
    _planted(entry, marker, ok=torch.zeros(2))  # swapped in under the old checksum
    assert load_cache(entry) is None and not entry.exists()  # fails the checksum first: discarded, never read
    _planted(entry, marker, ok=torch.zeros(2))  # no sidecar (cache format 0)
    with pytest.raises(UnsafeFileError, match=r"entry\.pt: not loaded.*system"):
        load_cache(entry)
    assert entry.exists() and not sidecar(entry).exists()  # kept, and never blessed with a checksum
    _write_sidecar(entry)  # an attacker who also rewrites the checksum
    with pytest.raises(UnsafeFileError, match=r"entry\.pt: not loaded.*system"):
        load_cache(entry)
    assert entry.exists() and sidecar(entry).exists()
    decoded = _planted(tmp_path / "decoded.pt", marker, train_images=torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(UnsafeFileError, match=r"decoded\.pt"):
        ImageSet.load_cache(decoded)


def test_expert_bank_refuses_a_crafted_expert(tmp_path, marker):
    bank = ExpertBank(tmp_path / "experts", {"data": "toy"}, {"name": "ConvNet", "width": 4, "depth": 1}, 0.01, 1,
                      batch_size=8, make_trainer=CPU)
    bank.dir.mkdir(parents=True)
    _planted(bank.path(0), marker, trajectory=torch.zeros(2, 5), test_acc=None, seconds=1.0)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 2
    with pytest.raises(UnsafeFileError, match=r"expert_000\.pt: not loaded: .*expert trajectory.*system"):
        bank.ensure(1, x, y, 2)
    assert CPU.stages == []  # refused before any training


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resume_checkpoints_refuse_a_crafted_pickle(tmp_path, marker, monkeypatch):
    """Our check before ``trainer.fit(ckpt_path=...)`` and Lightning's own loader with
    :func:`safe_fit_kwargs` both refuse; so does the statistics-matching recovery resume; even with
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set (it only overrides calls that pass no ``weights_only``)."""
    from lightning_dd.methods.images.statistics_matching.config import RecoverConfig
    from lightning_dd.methods.images.statistics_matching.recover import recover_batch
    from lightning_dd.methods.images.statistics_matching.statistics import Backbone

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt = tmp_path / "ck" / "last.ckpt"
    ckpt.parent.mkdir()
    _planted(ckpt, marker, state_dict={}, epoch=0, global_step=3)
    with pytest.raises(UnsafeFileError, match=r"last\.ckpt: not loaded: .*checkpoint.*system"):
        check_checkpoint(ckpt)
    assert safe_fit_kwargs() == {"weights_only": True}  # Lightning 2.6+
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(pickle.UnpicklingError):
        trainer.fit(_Tiny(), torch.utils.data.DataLoader(torch.zeros(2, 1)), ckpt_path=ckpt, **safe_fit_kwargs())
    net = build_net("ConvNet", 3, 2, (8, 8), width=4, depth=1, norm="batchnorm").eval()
    hp = RecoverConfig.model_validate({**node("method", "sre2l")["recover"], **dict(
        iterations=2, lr=0.1, r_bn=1.0, first_bn_multiplier=1.0, jitter=0, flip=False, crop_scale=[1.0, 1.0],
        crop_schedule="none", milestone=1.0, backbones_per_iter=1, r_conv=0.0, r_logit=0.0, ckpt_every=1)})
    lo, hi = torch.full((3,), -3.0), torch.full((3,), 3.0)
    with pytest.raises(UnsafeFileError, match=r"last\.ckpt: not loaded: .*recovery checkpoint"):
        recover_batch(torch.zeros(2, 3, 8, 8), torch.arange(2), [Backbone(net)], hp, lo, hi, seed=0, batch_index=0,
                      ckpt_dir=ckpt.parent, trainer=CPU, resume=True)


def test_a_real_lightning_checkpoint_passes_the_check(tmp_path):
    """What Lightning writes for our modules (weights, optimizer, loops, ModelCheckpoint state) is
    plain data: the check and a weights-only resume accept it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    loader = torch.utils.data.DataLoader(torch.zeros(4, 1))
    make = lambda steps: L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,  # noqa: E731
                                   enable_model_summary=False,
                                   callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)])
    make(2).fit(_Tiny(), loader)
    d = check_checkpoint(tmp_path / "last.ckpt")
    assert d["global_step"] == 2 and "optimizer_states" in d
    resumed = _Tiny()
    make(4).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt", **safe_fit_kwargs())
    straight = _Tiny()
    make(4).fit(straight, loader)
    assert torch.allclose(resumed.w, straight.w)


def test_current_format_round_trips_unchanged(tmp_path):
    r = _set()
    r.save(tmp_path / "distilled.pt")
    raw = safe_load(tmp_path / "distilled.pt")
    assert raw["format_version"] == FORMAT_VERSION == 1
    back = DistilledSet.load(tmp_path / "distilled.pt")
    for k, v in asdict(r).items():
        w = getattr(back, k)
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, w)
        elif k not in ("preprocessing", "meta"):
            assert v == w, k
    assert torch.equal(back.meta["hard_labels"], r.meta["hard_labels"]) and back.meta["net"] == r.meta["net"]
    assert torch.equal(back.preprocessing["std"], r.preprocessing["std"])
    g = CondensedGraph(torch.randn(3, 2), torch.zeros(3, 3), torch.tensor([0, 1, 0]), "gcond", 0.5, {"k": 1})
    g.save(tmp_path / "condensed.pt")
    h = CondensedGraph.load(tmp_path / "condensed.pt")
    assert torch.equal(h.x, g.x) and h.meta == {"k": 1} and h.reduction_rate == 0.5


def test_format_0_loads_and_a_newer_format_is_refused(tmp_path):
    """A dict without ``format_version`` (version 0: written by hand or by another tool) loads with
    defaults; a version from a newer lightning_dd is refused naming the file and both versions."""
    x = torch.randn(6, 1, 4, 4)
    torch.save({"images": x, "labels": torch.tensor([0, 1, 2, 0, 1, 2])}, tmp_path / "v0.pt")
    d = DistilledSet.load(tmp_path / "v0.pt")
    assert torch.equal(d.images, x) and d.lr is None and d.classes == ["0", "1", "2"] and d.ipc == 0
    soft = torch.randn(6, 4)
    torch.save({"images": x, "labels": soft, "lr": 0.02}, tmp_path / "v0soft.pt")
    assert DistilledSet.load(tmp_path / "v0soft.pt").classes == ["0", "1", "2", "3"]
    torch.save({"format_version": FORMAT_VERSION + 1, **asdict(_set())}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=rf"new\.pt: .*format version {FORMAT_VERSION + 1}.*newer lightning_dd"):
        DistilledSet.load(tmp_path / "new.pt")
    d = asdict(_set())
    del d["classes"]
    torch.save({"format_version": 1, **d}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt: not a complete distilled set: missing classes"):
        DistilledSet.load(tmp_path / "partial.pt")
