"""Pictures of synthetic sets: image grids saved as PNG and logged to W&B during distillation."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch


def image_grid(images: torch.Tensor, preprocessing, nrow: int) -> torch.Tensor:
    """``(N, C, H, W)`` model-space images -> ``(3, H', W')`` grid in [0, 1] (ZCA undone, clipped)."""
    import torchvision

    x = preprocessing.inverse(images.detach().float().cpu()).clamp(0, 1)
    if x.shape[-1] < 32:  # upsample tiny images (digits) so the grid is readable
        x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    return torchvision.utils.make_grid(x, nrow=nrow, padding=1, pad_value=1.0)


def _class_of_each(n: int, labels: torch.Tensor | None, num_classes: int, nrow: int | None) -> torch.Tensor:
    """``(n,)`` class index per image: hard labels, argmax of soft labels, else the class-major
    layout (``nrow`` images per class, else ``n // num_classes``)."""
    if labels is not None:
        labels = torch.as_tensor(labels).detach().cpu()
        return (labels.argmax(1) if labels.dim() == 2 else labels).long()
    per = nrow or max(1, n // max(1, num_classes))
    return torch.arange(n) // per


def _tiles(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, H, W)`` in [0, 1] -> ``(N, 3, size, size')`` (gray to RGB; integer upsampling is
    nearest-neighbour so small images stay crisp, anything else bilinear with antialiasing)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :3] if x.shape[1] > 3 else torch.cat([x, x[:, -1:].expand(-1, 3 - x.shape[1], -1, -1)], 1)
    h, w = x.shape[-2:]
    out = (size, max(1, round(w * size / h)))
    if (h, w) == out:
        return x
    if size % h == 0 and out[1] % w == 0:
        return torch.nn.functional.interpolate(x, size=out, mode="nearest")
    return torch.nn.functional.interpolate(x, size=out, mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0, 1)


def save_grid(images: torch.Tensor, preprocessing, path: str | Path, nrow: int | None = None,
              labels: torch.Tensor | None = None, classes: list[str] | None = None, max_width: int = 2000,
              max_classes: int = 100, title: str | None = None, max_per_class: int = 50) -> Path:
    """Save a labeled picture of a synthetic set as a PNG: one row per class with the class name at
    its left (IPC > 1), or a single row of tiles with each class name above its tile (IPC 1,
    wrapped after 10). Tiles are upsampled to at least 64 px (96 px at IPC 1) so 8x8 digits are
    readable, and the columns of a class wrap (e.g. IPC 50 -> 2 lines of 25) so the picture stays
    at most about ``max_width`` pixels wide.

    Args:
        images: ``(N, C, H, W)`` model space (``preprocessing.inverse`` maps them to pixels,
            clipped to [0, 1]; C = 1 drawn gray, C = 3 RGB).
        labels: ``(N,)`` hard labels or ``(N, K)`` soft labels / logits (argmax); ``None`` = the
            class-major layout, ``nrow`` images per class (the framework's order).
        classes: class names (index = label); ``None`` = the class indices.
        nrow: images per class when ``labels`` is ``None`` (else ignored).
        max_classes: at most this many classes are drawn (the first ones; the title says so).
        max_per_class: at most this many images of a class are drawn (its first ones; the title
            says so), so that a coreset of hundreds of images per class stays readable.
        title: optional title line above the grid.

    Returns: ``path``. Raises: ValueError: ``images`` not 4-D or empty, or ``labels`` not one per
    image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be (N, C, H, W) with N > 0, got shape {tuple(images.shape)}")
    n = images.shape[0]
    cls = _class_of_each(n, labels, len(classes or []), nrow)
    if len(cls) != n:
        raise ValueError(f"{n} images but {len(cls)} labels")
    k = int(cls.max()) + 1 if n else 0
    names = list(classes) if classes is not None else [str(i) for i in range(k)]
    names += [str(i) for i in range(len(names), k)]
    shown = [c for c in range(len(names)) if (cls == c).any()]
    note = ""
    if len(shown) > max_classes:
        note = f" (first {max_classes} of {len(shown)} classes)"
        shown = shown[:max_classes]
    most = max([int((cls == c).sum()) for c in shown] or [1])
    if most > max_per_class:  # keep the first max_per_class images of every class, in their order
        rank = torch.zeros(n, dtype=torch.long)
        for c in shown:
            at = torch.nonzero(cls == c).squeeze(1)
            rank[at] = torch.arange(len(at))
        keep = torch.nonzero(rank < max_per_class).squeeze(1)
        images, cls, n = images[keep], cls[keep], len(keep)
        note += f" (first {max_per_class} of up to {most} images per class)"
    x = preprocessing.inverse(images.detach().float().cpu()).clamp(0, 1)
    per = max([int((cls == c).sum()) for c in shown] or [1])
    h, w = x.shape[-2:]
    pad, gap = 2, 8

    single = per == 1
    if single:  # one tile per class: a row (wrapped) of captioned tiles
        cols = min(len(shown), 10) or 1
        size = max(h, 96) if h < 96 else min(h, max(32, max_width // cols - pad))
    else:
        lines = math.ceil(per / 25)
        cols = math.ceil(per / lines)
        size = min(max(h, 64), max(16, (max_width - 160) // cols - pad))
        size = min(size, max(16, 4000 // max(1, len(shown) * lines) - pad))  # keep very many classes in view
    t = _tiles(x, size)
    th, tw = t.shape[-2:]
    dpi = 100
    font = 10 if th >= 48 else 8
    char_w = font * 0.62 * dpi / 72
    fit = int((tw + 2 * pad + gap) / char_w) if single else 24  # long names (ImageNet) are shortened
    names = [nm if len(nm) <= fit else nm[:max(1, fit - 1)] + "…" for nm in names]
    label_w = 0 if single else int(max(len(names[c]) for c in shown) * char_w) + 14
    cap_h = int(font * 1.9 * dpi / 72) if single else 0
    title_h = int(13 * 2.0 * dpi / 72) if (title or note) else 0

    if single:
        rows = math.ceil(len(shown) / cols)
        cw, ch = tw + 2 * pad + gap, th + 2 * pad + cap_h
        canvas = torch.ones(3, rows * ch, cols * cw)
        spots = []
        for j, c in enumerate(shown):
            r, q = divmod(j, cols)
            i = int(torch.nonzero(cls == c)[0])
            y0, x0 = r * ch + cap_h + pad, q * cw + pad + gap // 2
            canvas[:, y0:y0 + th, x0:x0 + tw] = t[i]
            spots.append((x0 + tw / 2, r * ch + cap_h / 2 + pad, names[c]))
    else:
        lines = math.ceil(per / cols)
        rh = lines * (th + pad) + gap
        canvas = torch.ones(3, len(shown) * rh, cols * (tw + pad) + pad)
        spots = []
        for r, c in enumerate(shown):
            for j, i in enumerate(torch.nonzero(cls == c).flatten().tolist()):
                ln, q = divmod(j, cols)
                y0, x0 = r * rh + gap // 2 + ln * (th + pad), pad + q * (tw + pad)
                canvas[:, y0:y0 + th, x0:x0 + tw] = t[i]
            spots.append((-8, r * rh + rh / 2, names[c]))

    H, W = canvas.shape[1] + title_h, canvas.shape[2] + label_w
    fig = plt.figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes((label_w / W, 0, canvas.shape[2] / W, canvas.shape[1] / H))
    ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for sx, sy, name in spots:  # data coordinates of the canvas (pixels)
        ax.text(sx, sy, name, ha="center" if single else "right", va="center", fontsize=font, clip_on=False)
    if title or note:
        fig.text(0.5, 1 - (title_h / 2) / H, f"{title or ''}{note}", ha="center", va="center", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


class SyntheticImageLogger(L.Callback):
    """Every ``every`` training steps (and at the end), save the module's ``images`` as a labeled
    PNG grid (:func:`save_grid`, ``out_dir/step_NNNNNN.png``) and log the plain grid
    (:func:`image_grid`) to W&B (key ``synthetic_images``) when a W&B logger is attached.

    The class of each image is the module's ``labels`` (argmax when soft) when it has them, else
    the class-major layout with ``nrow`` (= IPC) images per class; ``classes`` names them.
    """

    def __init__(self, preprocessing, out_dir: str | Path, every: int, nrow: int, classes: list[str] | None = None):
        self.pre, self.out_dir, self.every, self.nrow, self.classes = preprocessing, Path(out_dir), every, nrow, classes

    def _log(self, trainer, module):
        images = getattr(module, "images", None)
        if images is None or not getattr(trainer, "is_global_zero", True):  # under DDP every rank holds the same set
            return
        labels = getattr(module, "labels", None)
        if not isinstance(labels, torch.Tensor) or labels.shape[:1] != images.shape[:1]:
            labels = None
        step = trainer.global_step
        save_grid(images, self.pre, self.out_dir / f"step_{step:06d}.png", self.nrow,
                  labels=None if labels is None else labels.detach().cpu(), classes=self.classes,
                  title=f"step {step}")
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image("synthetic_images", [image_grid(images, self.pre, self.nrow)], step=step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self._log(trainer, module)

    def on_train_end(self, trainer, module):
        self._log(trainer, module)


class PeriodicEvaluation(L.Callback):
    """Every ``every`` training steps, evaluate the module's current set (``module.current_set()``
    -> ``(images, labels, lr)``) with ``evaluate(images, labels, lr) -> accuracy`` and log it as
    ``distill/eval_acc`` (MTT/DATM's periodic evaluation during distillation)."""

    def __init__(self, evaluate, every: int):
        self.evaluate, self.every = evaluate, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every or step % self.every or not hasattr(module, "current_set"):
            return
        acc = float(self.evaluate(*module.current_set()))
        for lg in trainer.loggers:
            lg.log_metrics({"distill/eval_acc": acc}, step=step)
