"""Clips per second of MaST-Pre pretraining (forward + backward + AdamW step) at the CPU preset's
size (16 frames x 256 points, encoder dim 128 / depth 4, 128 tokens, decoder 128 / 2; batch 16) or
with --paper at the paper size (24 x 2048, dim 1024 / depth 5, decoder 512 / 4; batch 8), and the
time share of the point ops (farthest point sampling + ball query) in a step. Baseline in the same
run: the transformer-only step (the tube features precomputed), giving the ratio step / baseline.
Clips are random clouds of the data's shape and units (timing does not depend on the values).

    python benchmarks/point_video.py [--threads 1] [--steps 5] [--paper]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch

    import lightning_dd.nets.p4transformer as p4
    from lightning_dd.methods.point_video.mast_pre import MaSTPre, MaSTPreModule

    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--paper", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.paper:
        hp, shape = MaSTPre(name="mast_pre"), (8, 24, 2048, 3)
    else:
        hp = MaSTPre(name="mast_pre", encoder=dict(dim=128, depth=4, heads=4, mlp_dim=256, k=16, spatial_stride=16),
                     decoder_dim=128, decoder_depth=2, decoder_heads=4)
        shape = (16, 16, 256, 3)
    dev = torch.device(a.device)
    m = MaSTPreModule(hp.encoder.build(), hp, 100).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    clip = (torch.randn(*shape) * 0.5 + torch.tensor([0, 0, 9.0])).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    spent = {"fps": 0.0, "ball_query": 0.0}

    def timed(fn, key):
        def wrap(*args, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kw)
            sync()
            spent[key] += time.perf_counter() - t
            return out
        return wrap

    p4.farthest_point_sample = timed(p4.farthest_point_sample, "fps")
    p4.ball_query = timed(p4.ball_query, "ball_query")

    def step():
        opt.zero_grad()
        m.losses(clip)["loss"].backward()
        opt.step()

    step()  # warm-up
    spent.update(fps=0.0, ball_query=0.0)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    total = (time.perf_counter() - t0) / a.steps
    # baseline: the transformer part alone (encoder on visible tokens + decoder), tube features fixed
    with torch.no_grad():
        xyzt, feats = m.encoder.tokens(clip)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        opt.zero_grad()
        n_vis = feats.shape[1] - int(hp.mask_ratio * feats.shape[1])
        enc = m.encoder.encode(feats[:, :n_vis], xyzt[:, :n_vis])
        x = torch.cat([m.decoder_embed(enc), m.mask_token.expand(len(clip), feats.shape[1] - n_vis, -1)], 1)
        m.decoder_norm(m.decoder(x + m.decoder_pos(xyzt))).sum().backward()
        opt.step()
    sync()
    base = (time.perf_counter() - t0) / a.steps
    share = (spent["fps"] + spent["ball_query"]) / a.steps / total
    print(f"MaST-Pre pretraining, clips {tuple(shape)}, {a.device}, {a.threads} thread(s): "
          f"{shape[0] / total:.1f} clips/s ({total:.3f} s/step); FPS {spent['fps'] / a.steps:.3f} s + ball query "
          f"{spent['ball_query'] / a.steps:.3f} s per step = {100 * share:.1f}% of the step; transformer-only "
          f"baseline {base:.3f} s/step (step / baseline = {total / base:.2f}x)")


if __name__ == "__main__":
    main()
