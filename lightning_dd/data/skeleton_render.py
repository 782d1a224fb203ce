"""Skeleton-rendered point-cloud videos of MSR-Action3D (Li et al., CVPR-W 2010).

The depth maps of MSR-Action3D are not obtainable here; its real skeleton sequences are
(``msr_action3d/skeleton3D/aXX_sYY_eZZ_skeleton3D.txt``: 20 joints per frame, one ``x y z
confidence`` line each, camera-space metres, y up, z the depth; all-zero frames where tracking
failed). :func:`render_video` turns one sequence into the point-cloud video a depth camera would
see of a capsule body moving with those joints:

1. a capsule (cylinder + spherical ends) around each bone, radii 4-12 cm (:data:`BONES`), a head
   sphere of 10 cm; uniform samples on every capsule surface (``samples_per_frame`` per frame, by
   surface area), minus the samples inside another capsule (so only the body's outer surface);
2. a z-buffer at the Kinect v1 depth camera's intrinsics (focal length 280 px, 320x240, principal
   point at the centre): samples whose outward normal faces away from the camera are culled, a
   sample with a sample more than 3 cm nearer within +-1 pixel is occluded (the samples are
   sparser than the pixels), and per pixel only the nearest sample is kept: the camera-facing
   surface;
3. Kinect-like axial depth noise, sigma(z) = 1.2 mm + 1.9 mm (z/m - 0.4)^2 (Nguyen, Izadi &
   Lovell, 3DIMPVT 2012), and back-projection of the pixel centre at the noisy depth, in
   millimetres (the MeteorNet/P4Transformer files' units: readers divide by 300).

What it is: real motion, real labels, real subjects and split; rendered geometry (no clothing,
background, floor or real sensor artefacts). Accuracies on it are not comparable to results on
the depth-derived point clouds.

Deviations (with reasons): frames where tracking failed (all zeros) take the nearest tracked frame's
skeleton (the person did not vanish; dropping them would shorten the video); a sequence with no
tracked frame at all cannot be rendered and is listed in the cache manifest as skipped; each
rendered frame is resampled to ``points_per_frame`` points (without replacement, else repeated)
so a video is one ``(T, n, 3)`` array (the real files hold variable counts per frame).
"""
from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from lightning_dd.data.readers import DataFormatError

#: MSR-Action3D's joint order (0-based): shoulders, neck, spine, hips, hip centre, elbows, wrists,
#: hands, knees, ankles, feet, head.
JOINTS = ("l_shoulder", "r_shoulder", "neck", "spine", "l_hip", "r_hip", "hip_center", "l_elbow", "r_elbow",
          "l_wrist", "r_wrist", "l_hand", "r_hand", "l_knee", "r_knee", "l_ankle", "r_ankle", "l_foot", "r_foot",
          "head")
#: (joint a, joint b, radius in metres): the capsules of the body; (19, 19) is the head sphere.
BONES = ((2, 19, 0.05), (19, 19, 0.10), (2, 3, 0.12), (3, 6, 0.12), (0, 1, 0.07), (4, 5, 0.09), (0, 4, 0.09),
         (1, 5, 0.09), (0, 7, 0.05), (1, 8, 0.05), (7, 9, 0.04), (8, 10, 0.04), (9, 11, 0.04), (10, 12, 0.04),
         (4, 13, 0.08), (5, 14, 0.08), (13, 15, 0.06), (14, 16, 0.06), (15, 17, 0.045), (16, 18, 0.045))
FOCAL, WIDTH, HEIGHT = 280.0, 320, 240
OCCLUSION_TOL = 0.03  # metres
MAX_COORDINATE = 1000.0  # metres: beyond, the file is not a depth camera's skeleton (and rendering would overflow)
NAME = re.compile(r"a(\d+)_s(\d+)_e(\d+)")


def read_skeleton(path: str | Path) -> np.ndarray:
    """One MSR-Action3D ``*_skeleton3D.txt`` file.

    Shapes:
        Returns ``(T, 20, 4)`` float32: x, y, z (metres, camera space), confidence.

    Raises:
        FileNotFoundError: no file.
        DataFormatError (a ValueError): not UTF-8 text, not 4 numbers
            per line, not 20 lines per frame, NaN/inf values, or coordinates beyond
            :data:`MAX_COORDINATE` metres (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"skeleton file not found: {path}")
    try:
        with warnings.catch_warnings():  # an empty file: "input contained no data", refused below
            warnings.simplefilter("ignore", UserWarning)
            a = np.loadtxt(path, dtype=np.float32, ndmin=2, encoding="utf-8")
    except ValueError as e:  # also UnicodeDecodeError
        raise DataFormatError(f"{path}: not an MSR-Action3D skeleton file (4 numbers per line): "
                              f"{str(e)[:200]}") from None
    if a.shape[1] != 4 or len(a) % 20 or len(a) == 0:
        raise DataFormatError(f"{path}: expected 20 lines of 4 numbers per frame, got {a.shape[0]} lines of "
                              f"{a.shape[1]}")
    if not np.isfinite(a).all():
        raise DataFormatError(f"{path}: {int((~np.isfinite(a)).sum())} NaN/inf values (or beyond float32)")
    if np.abs(a[:, :3]).max() > MAX_COORDINATE:
        raise DataFormatError(f"{path}: joint coordinates up to {np.abs(a[:, :3]).max():.3g}; camera-space metres lie "
                              f"within +-{MAX_COORDINATE:g} (the real files: within 4)")
    return a.reshape(-1, 20, 4)


def fill_untracked(joints: np.ndarray) -> np.ndarray | None:
    """Frames with all-zero joints (tracking failed) replaced by the nearest tracked frame's.

    Shapes:
        joints: ``(T, 20, 3+)``. Returns the same shape, or ``None`` when no frame is tracked.
    """
    ok = np.abs(joints[..., :3]).sum((1, 2)) > 0
    if not ok.any():
        return None
    good = np.flatnonzero(ok)
    nearest = good[np.abs(np.arange(len(joints))[:, None] - good[None]).argmin(1)]
    return joints[nearest]


def _segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of points to segments, by batched matrix products (no ``(F, P, S, 3)`` temporaries).

    Shapes:
        p: ``(F, P, 3)``; a, b: ``(F, S, 3)``. Returns ``(F, P, S)``.
    """
    c = a.mean(1, keepdim=True)                          # centre each frame: less cancellation
    p, a, b = p - c, a - c, b - c
    d = b - a
    dd = d.pow(2).sum(-1).unsqueeze(1)                   # (F, 1, S)
    pa = p @ d.transpose(1, 2) - (a * d).sum(-1).unsqueeze(1)      # (p - a) . d
    t = (pa / dd.clamp_min(1e-12)).clamp(0, 1)
    pa2 = p.pow(2).sum(-1, keepdim=True) - 2 * p @ a.transpose(1, 2) + a.pow(2).sum(-1).unsqueeze(1)  # |p - a|^2
    return (pa2 - 2 * t * pa + t * t * dd).clamp_min(0).sqrt()


def sample_body_surface(joints: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform samples on the outer surface of the capsule body of each frame.

    Shapes:
        joints: ``(F, 20, 3)`` metres. Returns ``(F, n, 3)`` with NaN rows for the samples that fell
        inside another capsule or whose outward normal faces away from the camera (back-face
        culling; dropped later).
    """
    f = joints.shape[0]
    ia = torch.tensor([b[0] for b in BONES])
    ib = torch.tensor([b[1] for b in BONES])
    rad = torch.tensor([b[2] for b in BONES])
    a, b = joints[:, ia], joints[:, ib]                              # (F, S, 3)
    length = (b - a).norm(dim=-1).mean(0)                            # (S,) lengths over the chunk
    cyl, sph = 2 * torch.pi * rad * length, 4 * torch.pi * rad ** 2  # areas: side, two half-sphere ends
    w = torch.cat([cyl, sph])                                       # choose side or end per sample
    pick = torch.multinomial(w / w.sum(), f * n, replacement=True, generator=gen).view(f, n)
    bone = pick % len(BONES)
    side = pick < len(BONES)
    fa = torch.gather(a, 1, bone.unsqueeze(-1).expand(-1, -1, 3))
    fb = torch.gather(b, 1, bone.unsqueeze(-1).expand(-1, -1, 3))
    r = rad[bone].unsqueeze(-1)
    d = fb - fa
    dn = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    helper = torch.where(dn[..., :1].abs() < 0.9, torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]))
    e1 = torch.linalg.cross(dn, helper.expand_as(dn))
    e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    e2 = torch.linalg.cross(dn, e1)
    t = torch.rand(f, n, 1, generator=gen)
    th = torch.rand(f, n, 1, generator=gen) * 2 * torch.pi
    p_side = fa + t * d + r * (th.cos() * e1 + th.sin() * e2)
    u = torch.randn(f, n, 3, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    end = torch.where(torch.rand(f, n, 1, generator=gen) < 0.5, fa, fb)
    normal = torch.where(side.unsqueeze(-1), th.cos() * e1 + th.sin() * e2, u)
    p = torch.where(side.unsqueeze(-1), p_side, end + r * u)
    inside = (_segment_distance(p, a, b) < rad - 1e-4).any(-1)       # interior of another capsule
    back = (normal * p).sum(-1) >= 0                                  # faces away from the camera
    return torch.where((inside | back).unsqueeze(-1), torch.nan, p)


def zbuffer_project(points: torch.Tensor, gen: torch.Generator, noise: bool = True) -> list[torch.Tensor]:
    """The depth camera's view of each frame's samples: per pixel the nearest sample only, depth
    noise added, the pixel centre back-projected.

    Shapes:
        points: ``(F, P, 3)`` metres (NaN rows ignored). Returns F tensors ``(n_f, 3)`` in mm.
    """
    out = []
    for p in points:
        p = p[~p.isnan().any(-1) & (p[:, 2] > 0.1)]
        u = torch.floor(WIDTH / 2 + FOCAL * p[:, 0] / p[:, 2]).long()
        v = torch.floor(HEIGHT / 2 - FOCAL * p[:, 1] / p[:, 2]).long()
        ok = (u >= 0) & (u < WIDTH) & (v >= 0) & (v < HEIGHT)
        p, u, v = p[ok], u[ok], v[ok]
        pix = v * WIDTH + u
        # occlusion at the sampling density: a sample is hidden when a sample within +-1 pixel is
        # more than OCCLUSION_TOL nearer (samples are sparser than pixels; 3x3 min-pooled depth)
        zmap = torch.full((HEIGHT * WIDTH,), 1e6).scatter_reduce(0, pix, p[:, 2], "amin").view(1, 1, HEIGHT, WIDTH)
        zmin = -torch.nn.functional.max_pool2d(-zmap, 3, 1, 1).flatten()
        vis = p[:, 2] <= zmin[pix] + OCCLUSION_TOL
        p, pix = p[vis], pix[vis]
        order = torch.argsort(pix.double() * 1e3 + p[:, 2].double())  # by pixel, then depth (z < 1 km)
        spix = pix[order]
        first = torch.ones_like(spix, dtype=torch.bool)
        first[1:] = spix[1:] != spix[:-1]                           # the nearest sample of each pixel
        pix, z = spix[first], p[order[first], 2]
        if noise:
            z = z + (0.0012 + 0.0019 * (z - 0.4) ** 2) * torch.randn(z.shape, generator=gen)
        uu, vv = (pix % WIDTH).float() + 0.5, (pix // WIDTH).float() + 0.5
        x = (uu - WIDTH / 2) * z / FOCAL
        y = (HEIGHT / 2 - vv) * z / FOCAL
        out.append(torch.stack([x, y, z], -1) * 1000.0)
    return out


def resample_indices(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` indices into ``n`` points: without replacement when ``n >= m``, else every point
    ``m // n`` times plus ``m % n`` distinct extra ones (the P4Transformer loader's rule).

    Raises:
        ValueError: ``n == 0``.
    """
    if n == 0:
        raise ValueError("cannot resample an empty frame")
    if n >= m:
        return torch.randperm(n, generator=gen)[:m]
    rest = torch.randperm(n, generator=gen)[: m % n]
    return torch.cat([torch.arange(n).repeat(m // n), rest])


def render_video(joints: np.ndarray, points_per_frame: int = 2048, samples_per_frame: int = 20000,
                 seed: int = 0, chunk: int = 16, noise: bool = True) -> np.ndarray | None:
    """A skeleton sequence rendered as a depth-camera point-cloud video (module docstring).

    Shapes:
        joints: ``(T, 20, 3+)`` metres. Returns ``(T, points_per_frame, 3)`` float32 in mm, or
        ``None`` when no frame is tracked.
    """
    filled = fill_untracked(np.asarray(joints, dtype=np.float32))
    if filled is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    j = torch.from_numpy(filled[..., :3].copy())
    frames = []
    for part in j.split(chunk):
        for pts in zbuffer_project(sample_body_surface(part, samples_per_frame, gen), gen, noise):
            frames.append(pts[resample_indices(len(pts), points_per_frame, gen)])
    return torch.stack(frames).numpy().astype(np.float32)


def video_seed(name: str, seed: int) -> int:
    """A stable per-file seed (independent of the order files are rendered in)."""
    return int(hashlib.sha256(f"{name}:{seed}".encode()).hexdigest()[:8], 16)
