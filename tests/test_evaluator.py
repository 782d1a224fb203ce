"""The student evaluator: deterministic on CPU, seed-sensitive, label modes, clear errors on bad sets."""
import subprocess
import sys

import pytest
import torch

from configs import student_settings
from conftest import ROOT
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data import DigitsDataModule
from lightning_dd.evaluate import evaluate_set
from lightning_dd.results import DistilledSet


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup()
    return dm


def _eval(dm, x, y, seed, teacher=None, **kw):
    settings = student_settings(**{"num_eval": 1, "epochs": 30, "seed": seed, **kw})
    return evaluate_set(x, y, dm.test_images, dm.test_labels, 10, {"name": "ConvNet", "width": 16, "depth": 2},
                        settings, lr=0.01, make_trainer=TrainerFactory(accelerator="cpu"), teacher=teacher)


def test_run_r_is_seeded_with_seed_plus_r(digits):
    """Run r of an evaluation is the single run seeded seed + r: reproducible, and the seeds are
    what makes the runs differ (not leftover global RNG state)."""
    x, y = digits.random_subset(5, 0)
    two = _eval(digits, x, y, 0, num_eval=2)
    assert two.accs == [_eval(digits, x, y, 0).accs[0], _eval(digits, x, y, 1).accs[0]]
    assert two.accs[0] != two.accs[1]


def test_label_modes(digits):
    x, y = digits.random_subset(5, 0)
    soft = torch.nn.functional.one_hot(y, 10).float() * 8
    hard = _eval(digits, x, y, 0)
    # near one-hot soft labels through soft CE learn the same task: accuracy far above chance
    assert _eval(digits, x, soft, 0, soft_loss="kl", temperature=2.0).mean > 0.5
    assert _eval(digits, x, soft, 0, label_mode="hard").accs == hard.accs  # argmax == the hard labels
    with pytest.raises(ValueError, match="needs \\(N, K\\) soft labels"):
        _eval(digits, x, y, 0, label_mode="soft")
    with pytest.raises(ValueError, match="needs a teacher"):
        _eval(digits, x, y, 0, label_mode="teacher")
    # a teacher's logits as targets (KD): a linear "teacher" that is right on the training set
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        teacher[1].weight.copy_(torch.linalg.lstsq(x.flatten(1), soft).solution.T)
        teacher[1].bias.zero_()
    r = _eval(digits, x, y, 0, label_mode="teacher", teacher=teacher, soft_loss="kl", temperature=4.0)
    assert r.mean > 0.3


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(images=d["images"][:, :, :4]), "images are|shape"),
    (lambda d: d.update(labels=d["labels"][:-1]), "20 images but 19 labels"),
    (lambda d: d["images"].__setitem__((0, 0, 0, 0), float("nan")), "NaN"),
    (lambda d: d.update(labels=d["labels"] + 10), "labels must lie in"),
])
def test_malformed_saved_sets_fail_clearly(tmp_path, digits, mutate, message):
    x, y = digits.random_subset(2, 0)
    path = tmp_path / "distilled.pt"
    DistilledSet(x, y, None, digits.classes, digits.preprocessing.state(), "random", 2,
                 meta={"data": {"_target_": "lightning_dd.data.DigitsDataModule", "name": "digits"}}).save(path)
    d = torch.load(path, weights_only=False)
    mutate(d)
    torch.save(d, path)
    from hydra import compose, initialize_config_dir

    from lightning_dd.evaluate_run import evaluate_saved

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"result={path}", f"paths.output_dir={tmp_path / 'ev'}"])
    with pytest.raises(ValueError, match=message):
        evaluate_saved(cfg)


def test_missing_result_file_fails_clearly(tmp_path):
    from lightning_dd.evaluate_run import load_result

    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_result(tmp_path / "nope.pt")


def test_coreset_indices_and_image_folders_load_as_sets(tmp_path, digits):
    from PIL import Image

    from lightning_dd.evaluate_run import load_result

    idx = torch.tensor([3, 50, 700, 11])
    (tmp_path / "core.txt").write_text("\n".join(map(str, idx.tolist())))
    s = load_result(tmp_path / "core.txt", digits)
    assert torch.equal(s.images, digits.train_images[idx]) and torch.equal(s.labels, digits.train_labels[idx])
    (tmp_path / "bad.txt").write_text("5\n100000\n")
    with pytest.raises(ValueError, match="indices must lie in"):
        load_result(tmp_path / "bad.txt", digits)

    # a folder of PNGs, one per class folder, round-trips through the preprocessing
    pix = digits.preprocessing.inverse(digits.train_images[idx]).clamp(0, 1)
    for k, i in enumerate(idx.tolist()):
        d = tmp_path / "imgs" / digits.classes[int(digits.train_labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pix[k, 0] * 255).round().byte().numpy(), mode="L").save(d / f"{k}.png")
    f = load_result(tmp_path / "imgs", digits)
    assert sorted(f.labels.tolist()) == sorted(digits.train_labels[idx].tolist())
    order = [int(p.stem) for c in sorted((tmp_path / "imgs").iterdir()) for p in sorted(c.iterdir())]
    assert torch.allclose(f.images, digits.train_images[idx[order]], atol=0.05)


@pytest.mark.slow
def test_evaluate_cli_on_a_coreset(tmp_path):
    (tmp_path / "core.txt").write_text("\n".join(str(i) for i in range(0, 400, 8)))
    r = subprocess.run([sys.executable, "evaluate.py", f"result={tmp_path / 'core.txt'}", "data=digits",
                        "net.width=16", "net.depth=2", "eval.epochs=20", "eval.num_eval=2", "eval.baselines=[random]",
                        "trainer.compile=false", "logger.wandb.enabled=false", f"hydra.run.dir={tmp_path / 'ev'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = __import__("json").loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["eval/ConvNet/n_runs"] == 2 and 0.1 < m["eval/ConvNet/acc_mean"] <= 1
    assert "eval/ConvNet/improvement_over_random" in m


def test_bf16_mixed_precision_is_applied_and_learns_as_well(digits):
    """eval.precision=bf16-mixed: the training runs under bfloat16 autocast (so its accuracy is not
    bit-identical to fp32's) and learns the task about as well."""
    x, y = digits.random_subset(5, 0)
    fp32, bf16 = _eval(digits, x, y, 0), _eval(digits, x, y, 0, precision="bf16-mixed")
    assert bf16.accs != fp32.accs
    assert bf16.mean > 0.5 and abs(bf16.mean - fp32.mean) < 0.1, (fp32.accs, bf16.accs)
