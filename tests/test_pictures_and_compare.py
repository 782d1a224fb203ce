"""Pictures (``distilled.png``, compare plots) a researcher can put on a slide, and compare tables
that say what was actually run."""
import json
from dataclasses import asdict

import pytest
import torch
import yaml
from PIL import Image

from lightning_dd.compare import (aggregate_notes, aggregate_rows, find_runs, is_categorical, main, plot, plot_points,
                                  run_rows)
from lightning_dd.data.images import Preprocessing
from lightning_dd.results import DistilledSet
from lightning_dd.viz import SyntheticImageLogger, image_grid, save_grid

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _set(ipc, c=3, s=32, k=10):
    pre = Preprocessing((0.5,) * c, (0.25,) * c)
    x = pre.forward(torch.rand(k * ipc, c, s, s, generator=torch.Generator().manual_seed(ipc)))
    return x, torch.arange(k).repeat_interleave(ipc), pre


def test_digits_ipc1_is_one_readable_captioned_row(tmp_path):
    x, y, pre = _set(1, c=1, s=8)
    p = save_grid(x, pre, tmp_path / "d.png", labels=y, classes=[str(i) for i in range(10)])
    w, h = Image.open(p).size
    assert w >= 900 and 100 <= h <= 200  # one row of 10 tiles of 96 px (12x nearest), not 34x331
    import numpy as np

    im = np.asarray(Image.open(p).convert("L"))
    assert im.shape == (h, w) and (im < 250).mean() > 0.3  # mostly image, not white margin


@pytest.mark.parametrize("ipc,max_w", [(10, 900), (50, 2000)])
def test_cifar_like_grid_one_row_per_class(tmp_path, ipc, max_w):
    x, y, pre = _set(ipc)
    p = save_grid(x, pre, tmp_path / "g.png", labels=y, classes=CIFAR)
    w, h = Image.open(p).size
    assert 600 <= w <= max_w and h <= 1500
    if ipc == 50:  # 2 lines of 25 tiles per class, 64 px tiles
        assert w >= 25 * 64 and h >= 10 * 2 * 64


def test_grid_from_soft_labels_class_major_and_old_call(tmp_path):
    x, y, pre = _set(2)
    soft = torch.nn.functional.one_hot(y, 10).float() * 5 + torch.randn(20, 10) * 0.1
    a = save_grid(x, pre, tmp_path / "soft.png", labels=soft, classes=CIFAR)
    b = save_grid(x, pre, tmp_path / "major.png", nrow=2, classes=CIFAR)  # class-major, no labels
    c = save_grid(x, pre, tmp_path / "old.png", nrow=2)  # the pre-labels call still works
    assert Image.open(a).size == Image.open(b).size
    assert Image.open(c).size[1] == Image.open(b).size[1]
    assert image_grid(x, pre, 2).shape[0] == 3  # the W&B grid is unchanged
    with pytest.raises(ValueError, match="20 images but 3 labels"):
        save_grid(x, pre, tmp_path / "bad.png", labels=torch.tensor([0, 1, 2]))


def test_many_classes_stay_bounded(tmp_path):
    x, y, pre = _set(10, k=120, s=16)
    p = save_grid(x, pre, tmp_path / "many.png", labels=y, max_classes=100)
    w, h = Image.open(p).size
    assert w <= 2000 and h <= 5000


def test_a_coreset_of_hundreds_per_class_shows_its_first_50(tmp_path):
    import numpy as np

    x, y, pre = _set(133)  # e.g. DQ with the pixel step at keep 10 %: 133 images per class
    p = save_grid(x, pre, tmp_path / "big.png", labels=y, classes=CIFAR)
    q = save_grid(x[y.argsort(stable=True)].reshape(10, 133, 3, 32, 32)[:, :50].reshape(-1, 3, 32, 32), pre,
                  tmp_path / "fifty.png", labels=torch.arange(10).repeat_interleave(50), classes=CIFAR, title="t")
    assert Image.open(p).size == Image.open(q).size  # the same 2 lines of 25 tiles per class (and a title line)
    w, h = Image.open(p).size
    assert w >= 25 * 64 and h <= 10 * 2 * 80 + 60
    title_h = int(13 * 2.0 * 100 / 72)  # save_grid's title band; below it the two pictures are the same pixels
    below = [np.asarray(Image.open(f).convert("RGB"))[title_h:] for f in (p, q)]
    assert np.array_equal(*below)  # the first 50 images of every class, in their order


def test_the_pixel_step_figure_shows_selected_masked_and_reconstructed(tmp_path):
    from lightning_dd.methods.images.pixel_quantization import pixel_step_panels, save_pixel_step_figure

    x, y, pre = _set(2)
    y = y.flip(0)  # [9, 9, 8, 8, ..., 0, 0]: the first image of class c is at 18 - 2c
    dropped = torch.zeros(20, 64, dtype=torch.bool)
    dropped[:, :16] = True  # the top 2 patch rows of every 32x32 image (4x4 patches, row-major)
    dropped[:, 63] = True  # and its bottom-right patch
    first, (sel, masked, rec) = pixel_step_panels(x, dropped, x.flip(-1), y, pre, 4)
    assert first == [18 - 2 * c for c in range(10)]
    assert torch.allclose(sel, pre.inverse(x[first]).clamp(0, 1))
    assert torch.allclose(rec, pre.inverse(x[first].flip(-1)).clamp(0, 1))
    gray = torch.zeros(32, 32, dtype=torch.bool)
    gray[:8], gray[28:, 28:] = True, True
    assert (masked[:, :, gray] == 0.5).all() and torch.equal(masked[:, :, ~gray], sel[:, :, ~gray])
    p = save_pixel_step_figure(x, dropped, x.flip(-1), y, CIFAR, pre, 4, tmp_path / "pixel_step.png")
    w, h = Image.open(p).size
    assert w > h > 300  # 3 rows x 10 classes


def test_synthetic_image_logger_uses_module_labels(tmp_path):
    from types import SimpleNamespace

    x, y, pre = _set(3)
    module = SimpleNamespace(images=x, labels=torch.nn.functional.one_hot(y, 10).float())
    trainer = SimpleNamespace(global_step=7, loggers=[])
    SyntheticImageLogger(pre, tmp_path, every=1, nrow=3, classes=CIFAR)._log(trainer, module)
    assert Image.open(tmp_path / "step_000007.png").size[0] >= 250


def _run(d, method, ipc, seed, acc, extra_cfg=None, metrics=None, overrides=()):
    (d / ".hydra").mkdir(parents=True)
    m = {"eval/ConvNet/acc_mean": acc, "eval/ConvNet/acc_std": 0.01, **(metrics or {})}
    (d / "metrics.json").write_text(json.dumps(m))
    cfg = {"seed": seed, "method": {"name": method, "ipc": ipc}, "eval": {"seed": 0}, **(extra_cfg or {})}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}", f"method.ipc={ipc}", *overrides]))


def test_plot_kind_follows_the_x_axis(tmp_path):
    assert is_categorical("seed", [0, 1]) and is_categorical("arch", ["ConvNet"])
    assert is_categorical("method.ipc", [10.0]) and is_categorical("method.init", ["real", "noise"])
    assert not is_categorical("method.ipc", [1.0, 10.0, 50.0])
    for ipc in (1, 10, 50):
        for seed in (0, 1):
            _run(tmp_path / "many" / f"dm-{ipc}-{seed}", "dm", ipc, seed, 0.3 + ipc / 200 + seed / 100)
            _run(tmp_path / "many" / f"mtt-{ipc}-{seed}", "mtt", ipc, seed, 0.4 + ipc / 200 + seed / 100)
    runs = find_runs([tmp_path / "many"])
    assert plot(runs, tmp_path / "ipc.png", "method.ipc", "eval/ConvNet") == "lines"
    assert set(plot_points(runs, "method.ipc", "eval/ConvNet")["dm"]) == {1.0, 10.0, 50.0}
    assert plot(runs, tmp_path / "seed.png", "seed", "eval/ConvNet") == "bars"
    one = [r for r in runs if r.overrides["method.ipc"] == "10"]
    assert plot(one, tmp_path / "one.png", "method.ipc", "eval/ConvNet") == "bars"
    for f in ("ipc.png", "seed.png", "one.png"):
        assert (tmp_path / f).stat().st_size > 5000
    with pytest.raises(ValueError, match="no run has both"):
        plot(runs, tmp_path / "none.png", "method.nothing", "eval/ConvNet")


def test_fixed_random_baseline_is_footnoted(tmp_path, capsys):
    base = {"baseline/random/ConvNet/acc_mean": 0.25, "baseline/random/ConvNet/acc_std": 0.01}
    for seed in (0, 1, 2):
        _run(tmp_path / f"s{seed}", "dm", 10, seed, 0.5 + seed / 100, metrics=base)
    runs = find_runs([tmp_path])
    header, rows = aggregate_rows(runs)
    cell = rows[0][header.index("baseline/random/ConvNet")]
    assert cell == "25.00 ± 0.00 †" and not rows[0][header.index("eval/ConvNet")].endswith("†")
    notes = aggregate_notes(runs)
    assert len(notes) == 1 and "eval.seed" in notes[0] and "baseline/random/ConvNet" in notes[0]
    assert main([str(tmp_path), "--markdown"]) == 0
    assert "not a measured spread of 0" in capsys.readouterr().out
    # different eval seeds that happen to tie are not marked as fixed
    for i, d in enumerate(sorted(tmp_path.iterdir())):
        c = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        c["eval"]["seed"] = i
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(c))
    assert aggregate_notes(find_runs([tmp_path])) == []


def _evaluate_run(d, result, net_override=None, use_config_net=False):
    cfg = {"result": str(result), "seed": 0, "use_config_net": use_config_net, "net": {"name": "ConvNet", "width": 128},
           "eval": {"seed": 0}}
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"result={result}"]))
    (d / "metrics.json").write_text(json.dumps({"eval/ResNet18/acc_mean": 0.3, "eval/ResNet18/acc_std": 0.01}))


def test_compare_shows_the_net_an_evaluate_run_used(tmp_path):
    x, y, pre = _set(1, c=1, s=8)
    r = DistilledSet(x, y, None, CIFAR, {}, method="dm", ipc=1, meta={"net": {"name": "ResNet18", "norm": "batch"}})
    r.save(tmp_path / "made" / "distilled.pt")
    _evaluate_run(tmp_path / "runs" / "ev1", tmp_path / "made")
    _evaluate_run(tmp_path / "runs" / "ev2", tmp_path / "made" / "distilled.pt", use_config_net=True)
    _evaluate_run(tmp_path / "runs" / "ev3", tmp_path / "gone" / "distilled.pt")  # result moved: config's net
    (tmp_path / "runs" / "ev4").mkdir()
    _evaluate_run(tmp_path / "runs" / "ev4" / "x", tmp_path / "gone")
    (tmp_path / "runs" / "ev4" / "x" / "net.yaml").write_text(yaml.safe_dump({"name": "VGG11", "width": 64}))
    runs = {r.name.split("/runs/")[1]: r for r in find_runs([tmp_path / "runs"])}
    assert runs["ev1"].config["net.name"] == "ResNet18" and "net.width" not in runs["ev1"].config
    assert runs["ev2"].config["net.name"] == "ConvNet"
    assert runs["ev3"].config["net.name"] == "ConvNet"
    assert runs["ev4/x"].config["net.name"] == "VGG11" and runs["ev4/x"].config["net.width"] == 64
    header, rows = run_rows(list(runs.values()))
    assert "net.name" in header
    assert asdict(r)["meta"]["net"]["name"] == "ResNet18"
