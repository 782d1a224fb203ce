"""Where do 1 and 2 torch threads part in `qat_vit_cifar10 scale=cpu`? Runs each stage twice in one
process, with ``torch.set_num_threads(1)`` and ``(2)``, from identical inputs, and prints how far the
results are apart:

* the FP model: one forward (logits), and the weights after ``--fp-steps`` AdamW steps of the FP
  recipe from the same init;
* calibration (PTQ) of the same FP model on the same images: the activation steps, and the integer
  codes of every quantizer on a test batch;
* QAT: the quantized weights' integer codes after ``--qat-steps`` KD steps from the same
  calibrated model.

    python experiments/qat_vit/thread_dependence.py [--fp-ckpt <cache>/qat_vit_fp/<key>/fp.pt]

Inputs are CIFAR-10 training images when ``--data`` has them (``LDD_DATA_DIR``), else seeded noise.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F


def images(n: int, data_dir: str | None) -> torch.Tensor:
    """``(n, 3, 32, 32)``: the first CIFAR-10 training images, normalized, or seeded noise."""
    if data_dir:
        try:
            from lightning_dd.data.images import ImageDataModule  # noqa: F401
            import hydra
            from hydra import compose, initialize_config_dir
            from pathlib import Path

            root = Path(__file__).resolve().parents[2] / "conf"
            with initialize_config_dir(str(root), version_base=None):
                cfg = compose("train", overrides=["experiment=qat_vit_cifar10", "scale=cpu",
                                                  f"paths.data_dir={data_dir}"])
            dm = hydra.utils.instantiate(cfg.data)
            dm.setup()
            return dm.train_images[:n].clone()
        except Exception as e:  # noqa: BLE001 - fall back to noise, say so
            print(f"(no CIFAR-10: {type(e).__name__}: {e}; seeded noise instead)")
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def build_fp(ckpt: str | None):
    from lightning_dd.nets.vit import ViT

    torch.manual_seed(0)
    net = ViT(3, 10, (32, 32), patch_size=4, embed_dim=192, depth=6, num_heads=3)
    if ckpt:
        net.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    return net.eval()


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"max |diff| {float(d.max()):.3g} (rel {float(d.max() / b.double().abs().max().clamp(min=1e-30)):.2g}), " \
           f"{int((a != b).sum())}/{a.numel()} elements differ"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp-ckpt", default=None)
    ap.add_argument("--data", default=None, help="the data dir holding cifar10/ (LDD_DATA_DIR)")
    ap.add_argument("--fp-steps", type=int, default=5)
    ap.add_argument("--qat-steps", type=int, default=5)
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    from lightning_dd.losses import soft_cross_entropy
    from lightning_dd.methods.quantization.qat_vit.model import calibrate, quantize_vit, quantized_layers, quantizers

    x = images(192, args.data)
    fp0 = build_fp(args.fp_ckpt)
    res = {}
    for t in (1, 2):
        torch.set_num_threads(t)
        r = res[t] = {}
        fp = copy.deepcopy(fp0)
        with torch.no_grad():
            r["logits"] = fp(x[:64])
        tr = copy.deepcopy(fp0).train()
        torch.manual_seed(1)
        opt = torch.optim.AdamW(tr.parameters(), lr=1e-3, weight_decay=0.05)
        y = torch.arange(64) % 10
        for _ in range(args.fp_steps):
            opt.zero_grad()
            F.cross_entropy(tr(x[:64]), y, label_smoothing=0.1).backward()
            opt.step()
        r["fp_trained"] = torch.cat([p.detach().flatten() for p in tr.parameters()])
        q = calibrate(quantize_vit(fp, args.bits), x[64:128])
        r["act_steps"] = torch.stack([qq.step.detach() for qq in quantizers(q).values() if qq.kind == "act"])
        codes = {}
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: codes.__setitem__(n, o.detach() / m.step.detach()))
                 for n, m in quantizers(q).items() if m.kind == "act"]
        with torch.no_grad():
            r["ptq_logits"] = q(x[128:192])
        for h in hooks:
            h.remove()
        r["ptq_codes"] = torch.cat([c.round().flatten() for c in codes.values()])
        student = copy.deepcopy(q).train()
        opt = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=1e-4)
        for s in range(args.qat_steps):
            xb = x[(s * 32) % 160:(s * 32) % 160 + 32]
            with torch.no_grad():
                target = fp(xb)
            opt.zero_grad()
            soft_cross_entropy(student(xb), target).backward()
            opt.step()
        r["qat_codes"] = torch.cat([lay.wq.integers(lay.weight).flatten() for lay in quantized_layers(student).values()])
        r["qat_weights"] = torch.cat([lay.weight.detach().flatten() for lay in quantized_layers(student).values()])
    a, b = res[1], res[2]
    print(f"FP forward logits, 1 vs 2 threads:        {diff(a['logits'], b['logits'])}")
    print(f"FP weights after {args.fp_steps} AdamW steps:         {diff(a['fp_trained'], b['fp_trained'])}")
    print(f"calibrated activation steps:             {diff(a['act_steps'], b['act_steps'])}")
    print(f"PTQ activation codes on 64 images:       {diff(a['ptq_codes'], b['ptq_codes'])}")
    print(f"PTQ logits:                              {diff(a['ptq_logits'], b['ptq_logits'])}")
    print(f"QAT weights after {args.qat_steps} steps:               {diff(a['qat_weights'], b['qat_weights'])}")
    print(f"QAT weight codes after {args.qat_steps} steps:          {diff(a['qat_codes'], b['qat_codes'])}")


if __name__ == "__main__":
    main()
