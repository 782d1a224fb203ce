"""A new data family from outside the package: a Protocol, a DataModule satisfying it and a method
typed against it, run by ``python train.py`` with nothing under ``lightning_dd/`` changed; a method
handed another family's data fails before ``run``, naming both."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar, Literal, Protocol, runtime_checkable

import lightning as L
import torch

from conftest import ROOT
from lightning_dd.core.config import PositiveInt, Typed
from lightning_dd.methods.base import Method, MethodOutput, RunContext


@runtime_checkable
class SequenceData(Protocol):
    """Labelled 1-D sequences: ``train_x (N, T)``, ``train_y (N,)``, the same for test."""

    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


class NoisySines(L.LightningDataModule):
    """Sines of one frequency per class plus Gaussian noise (``noise`` x unit amplitude)."""

    def __init__(self, name: str, num_classes: int, per_class: int, length: int, noise: float, seed: int):
        super().__init__()
        self.name, self.num_classes, self.per_class = name, num_classes, per_class
        self.length, self.noise, self.seed = length, noise, seed

    def _split(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(self.num_classes).repeat_interleave(self.per_class)
        t = torch.linspace(0, 1, self.length)
        phase = torch.rand(len(y), 1, generator=g) * 0.3
        x = torch.sin(2 * torch.pi * (y[:, None] + 1) * (t + phase)) + self.noise * torch.randn(len(y), self.length,
                                                                                                generator=g)
        return x, y

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(self.seed)
        self.train_x, self.train_y = self._split(g)
        self.test_x, self.test_y = self._split(g)


class TemplateEval(Typed):
    """The toy family's ``eval`` node: nearest-template accuracy against ``baseline`` templates."""

    baseline: Literal["random"]
    seed: int


class Templates:
    """The toy family's result: ``k`` templates per class, ``x (C*k, T)``, ``y (C*k,)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def accuracy(self, data: SequenceData) -> float:
        nearest = torch.cdist(data.test_x, self.x).argmin(1)
        return float((self.y[nearest] == data.test_y).float().mean())


class ClassMeans(Method):
    """Distils each class into ``k`` templates: the means of ``k`` equal chunks of its sequences."""

    data_protocol: ClassVar[type | None] = SequenceData
    eval_schema: ClassVar[type | None] = TemplateEval
    k: PositiveInt

    def run(self, ctx: RunContext[SequenceData]) -> MethodOutput:
        dm = ctx.dm
        xs, ys = [], []
        for c in range(dm.num_classes):
            for chunk in dm.train_x[dm.train_y == c].chunk(self.k):
                xs.append(chunk.mean(0))
                ys.append(c)
        return MethodOutput(result=Templates(torch.stack(xs), torch.tensor(ys)))

    def save(self, ctx: RunContext[SequenceData], out: MethodOutput) -> None:
        torch.save({"x": out.result.x, "y": out.result.y}, ctx.out_dir / "templates.pt")

    def evaluate(self, ctx: RunContext[SequenceData], out: MethodOutput) -> dict:
        dm, g = ctx.dm, torch.Generator().manual_seed(ctx.eval.seed)
        pick = torch.cat([torch.nonzero(dm.train_y == c).flatten()[torch.randperm(int((dm.train_y == c).sum()),
                                                                                  generator=g)[: self.k]]
                          for c in range(dm.num_classes)])
        random = Templates(dm.train_x[pick], dm.train_y[pick])
        return {"eval/acc": out.result.accuracy(dm), f"baseline/{ctx.eval.baseline}/acc": random.accuracy(dm)}


def _write_conf(root: Path) -> Path:
    conf = root / "conf"
    files = {
        "data/sines.yaml": """\
            _target_: test_toy_family.NoisySines
            name: sines
            num_classes: 4
            per_class: 50
            length: 64
            noise: 2.0
            seed: 0
        """,
        "method/class_means.yaml": """\
            _target_: test_toy_family.ClassMeans
            name: class_means
            k: 1
        """,
        "eval/templates.yaml": """\
            baseline: random
            seed: 0
        """,
        "experiment/sines.yaml": """\
            # @package _global_
            defaults:
              - override /data: sines
              - override /method: class_means
              - override /eval: templates
        """,
    }
    for rel, text in files.items():
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_text(textwrap.dedent(text))
    return conf


def _train(conf: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "WANDB_MODE": "offline", "LDD_CACHE_DIR": str(run_dir)}
    args = [sys.executable, "train.py", f"--config-dir={conf}", *overrides, "logger.wandb.enabled=false",
            f"hydra.run.dir={run_dir}"]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_new_data_family_is_a_protocol_a_datamodule_and_a_method(tmp_path):
    conf = _write_conf(tmp_path)
    r = _train(conf, tmp_path / "run", "experiment=sines")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["eval/acc"] > m["baseline/random/acc"] + 0.1, m  # class means beat one random sequence per class
    saved = torch.load(tmp_path / "run" / "templates.pt", weights_only=True)
    assert saved["x"].shape == (4, 64) and saved["y"].tolist() == [0, 1, 2, 3]


def test_a_method_given_another_familys_data_fails_before_running(tmp_path):
    conf = _write_conf(tmp_path)
    r = _train(conf, tmp_path / "run", "experiment=sines", "data=digits")
    assert r.returncode != 0
    assert "ClassMeans reads a SequenceData DataModule, but data._target_ built a DigitsDataModule" in r.stdout + r.stderr
