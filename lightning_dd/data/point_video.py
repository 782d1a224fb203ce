"""Point-cloud videos in the MeteorNet / P4Transformer MSR-Action3D layout, as a LightningDataModule.

Layout (Liu et al. MeteorNet, ICCV 2019; Fan et al. P4Transformer, CVPR 2021): a folder with one
``aXX_sYY_eZZ*.npz`` per video holding the key ``point_clouds``: the frames, either one ``(T, N, 3)``
array or an object array of ``(N_t, 3)`` frames (loaded only with ``allow_pickle=True``: unpickling
can run code). Label = ``XX - 1``; subjects 1-5 train, 6-10 test (P4Transformer's split).

Clips (P4Transformer's ``MSRAction3D`` dataset): ``clip_len`` frames ``frame_stride`` apart, one clip
starting at every ``clip_step``-th frame; each frame resampled to ``num_points`` (without
replacement, else every point repeated plus a random remainder); coordinates divided by 300 (the
reference units: mm / 300); training clips scaled per axis by U(0.9, 1.1). Test clips are
resampled with a per-clip seed (reproducible); a video's prediction is the sum of its clips' scores
(:func:`video_accuracy`).

A training video shorter than a clip gives no clip, as the reference's loader (so an epoch has the
reference's number of clips). Deviation: a *test* video shorter than a clip is padded by repeating
its last frame, giving it one clip (the reference loader drops such videos from evaluation too,
which leaves them out of the accuracy).

``format: skeleton`` renders MSR-Action3D's real skeleton sequences into this layout once
(:mod:`lightning_dd.data.skeleton_render`; real motion, labels and split, rendered geometry).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_dd.data.readers import DataFormatError, DataNotFoundError
from lightning_dd.data.skeleton_render import NAME, read_skeleton, render_video, resample_indices, video_seed

log = logging.getLogger(__name__)
RENDER_VERSION = 2


def parse_video_name(path: str | Path) -> tuple[int, int, int]:
    """``(label, subject, episode)`` of ``aXX_sYY_eZZ...``: label = XX - 1.

    Raises:
        DataFormatError (a ValueError): the name has no ``aXX_sYY_eZZ`` field, or ``XX`` is 0 (no
            label -1); the message names the file.
    """
    m = NAME.search(Path(path).name)
    if m is None:
        raise DataFormatError(f"{path}: file name has no aXX_sYY_eZZ field (MSR-Action3D naming)")
    if int(m.group(1)) < 1:
        raise DataFormatError(f"{path}: action number a{m.group(1)} must be >= 1 (label = XX - 1)")
    return int(m.group(1)) - 1, int(m.group(2)), int(m.group(3))


def read_point_video(path: str | Path, allow_pickle: bool = False) -> list[torch.Tensor]:
    """The frames of one ``.npz`` video (key ``point_clouds``).

    Shapes:
        Returns T float32 tensors ``(N_t, 3)`` in the file's units.

    Raises:
        FileNotFoundError: no file.
        DataFormatError (a ValueError): not an npz (zip) file,
            unreadable/corrupt/truncated, no ``point_clouds`` key, an object array without
            ``allow_pickle``, no frames, a frame not ``(N_t >= 1, 3)`` integers or floats, or NaN/inf
            coordinates (each message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point-cloud video not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load would try other formats (.npy, pickle)
            raise DataFormatError(f"{path}: not an npz (zip) file (empty, truncated or another format)")
    try:
        with np.load(path, allow_pickle=allow_pickle) as z:
            if "point_clouds" not in z.files:
                raise DataFormatError(f"{path}: no 'point_clouds' key (keys: {z.files})")
            pc = z["point_clouds"]
    except DataFormatError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataFormatError(f"{path}: 'point_clouds' is an object array (frames of different sizes); "
                                  f"set data.allow_pickle=true only if you trust this file") from None
        raise DataFormatError(f"{path}: not a readable npz file: {e}") from None
    except Exception as e:  # BadZipFile, zlib.error, EOFError, OSError, MemoryError, ...
        raise DataFormatError(f"{path}: not a readable npz file (corrupt or truncated): {type(e).__name__}: "
                              f"{str(e)[:200]}") from None
    frames = list(pc) if pc.dtype == object or pc.ndim == 3 else None
    if not frames:
        raise DataFormatError(f"{path}: 'point_clouds' must hold T >= 1 frames of (N_t, 3) points, got shape "
                              f"{pc.shape}")
    out = []
    for t, f in enumerate(frames):
        if not isinstance(f, np.ndarray):
            raise DataFormatError(f"{path}: frame {t} is a {type(f).__name__}, not an array of points")
        if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0 or f.dtype == np.bool_ or not (
                np.issubdtype(f.dtype, np.integer) or np.issubdtype(f.dtype, np.floating)):
            raise DataFormatError(f"{path}: frame {t} must be (N_t >= 1, 3) integers or floats, got {f.shape} "
                                  f"{f.dtype}")
        with np.errstate(over="ignore"):  # beyond float32: inf, refused just below
            f = f.astype(np.float32)
        if not np.isfinite(f).all():
            raise DataFormatError(f"{path}: frame {t} has {int((~np.isfinite(f)).sum())} NaN/inf coordinates "
                                  f"(in float32)")
        out.append(torch.from_numpy(f))
    return out


class PointVideos:
    """The videos of one folder: frames, labels, subjects and file names (all read at once)."""

    def __init__(self, root: str | Path, allow_pickle: bool = False, names: list[str] | None = None):
        root = Path(root)
        files = sorted(root.glob("*.npz"))
        if names is not None:
            keep = set(names)
            files = [f for f in files if NAME.search(f.name) and NAME.search(f.name).group(0) in keep]
        if not files:
            raise DataNotFoundError(f"no aXX_sYY_eZZ*.npz point-cloud videos in {root}")
        self.files = files
        meta = [parse_video_name(f) for f in files]
        self.labels = torch.tensor([m[0] for m in meta])
        self.subjects = torch.tensor([m[1] for m in meta])
        self.videos = [read_point_video(f, allow_pickle) for f in files]


class ClipDataset(Dataset):
    """Clips of a set of videos (module docstring). Items: ``(clip (clip_len, num_points, 3), label,
    video index)``, the clip in reference units (file units / 300).

    Args:
        videos: lists of frames ``(N_t, 3)``; labels: ``(V,)``; train: scale jitter and random
            resampling (else a fixed per-clip seed); views: 2 returns two independent resamplings/jitters
            of the same clip stacked ``(2, clip_len, num_points, 3)`` (contrastive pretext);
            pad_short: a video shorter than a clip gives one clip, its last frame repeated (else
            none, the reference's ``range(0, T - frame_stride * (clip_len - 1), clip_step)``).
    """

    def __init__(self, videos, labels, clip_len: int, frame_stride: int, clip_step: int, num_points: int,
                 train: bool, jitter: tuple[float, float] = (0.9, 1.1), unit: float = 300.0, views: int = 1,
                 pad_short: bool = True):
        self.videos, self.labels = videos, labels
        self.clip_len, self.frame_stride, self.num_points = clip_len, frame_stride, num_points
        self.train, self.jitter, self.unit, self.views = train, jitter, unit, views
        span = frame_stride * (clip_len - 1)
        self.index = [(v, t) for v, vid in enumerate(videos)
                      for t in range(0, max(len(vid) - span, int(pad_short)), clip_step)]

    def __len__(self) -> int:
        return len(self.index)

    def _clip(self, v: int, t: int, gen: torch.Generator | None) -> torch.Tensor:
        vid = self.videos[v]
        frames = [vid[min(t + i * self.frame_stride, len(vid) - 1)] for i in range(self.clip_len)]
        clip = torch.stack([f[resample_indices(len(f), self.num_points, gen)] for f in frames])
        if self.train:
            lo, hi = self.jitter
            clip = clip * (lo + (hi - lo) * torch.rand(3, generator=gen))
        return clip / self.unit

    def __getitem__(self, i: int):
        v, t = self.index[i]
        gen = None if self.train else torch.Generator().manual_seed(i)
        clip = self._clip(v, t, gen) if self.views == 1 else torch.stack([self._clip(v, t, gen) for _ in range(self.views)])
        return clip, self.labels[v], v


def video_accuracy(scores: torch.Tensor, video_idx: torch.Tensor, labels: torch.Tensor) -> float:
    """Video-level accuracy: each video's clip scores summed, argmax vs its label.

    Shapes:
        scores: ``(n_clips, C)``; video_idx: ``(n_clips,)`` into ``labels`` ``(V,)``. Only videos with
        a clip count.
    """
    tot = torch.zeros(len(labels), scores.shape[1]).index_add_(0, video_idx, scores.float())
    seen = torch.zeros(len(labels), dtype=torch.bool)
    seen[video_idx] = True
    return float((tot[seen].argmax(1) == labels[seen]).float().mean())


def _atomic_savez(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_skeleton_folder(skeleton_root: str | Path, cache_dir: str | Path, points_per_frame: int,
                           samples_per_frame: int, seed: int = 0) -> Path:
    """Render every ``*_skeleton3D.txt`` of ``skeleton_root`` into ``<cache_dir>/msr_rendered_<key>/``
    (one npz per video, key ``point_clouds`` ``(T, points_per_frame, 3)`` float32 mm), once: a
    ``manifest.json`` written last marks a complete folder (it lists skipped, never-tracked files);
    each npz is written atomically, so an interrupted render resumes.

    Raises:
        DataNotFoundError: no skeleton files.
        DataFormatError (a ValueError): a malformed file, a
            file name without ``aXX_sYY_eZZ``, or a sequence that renders to an empty or non-finite
            frame (each names the file); the videos rendered before it stay (complete npz files).
    """
    skeleton_root = Path(skeleton_root)
    files = sorted(skeleton_root.glob("a*_s*_e*_skeleton3D.txt"))
    if not files:
        raise DataNotFoundError(f"no aXX_sYY_eZZ_skeleton3D.txt files in {skeleton_root} (MSR-Action3D skeletons)")
    for f in files:
        parse_video_name(f)  # every name valid before anything is rendered
    key = hashlib.sha256(json.dumps([RENDER_VERSION, points_per_frame, samples_per_frame, seed,
                                     [(f.name, f.stat().st_size) for f in files]]).encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"msr_rendered_{key}"
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    log.info("rendering %d MSR-Action3D skeleton sequences into %s (once)", len(files), out)
    skipped = []
    for i, f in enumerate(files):
        name = NAME.search(f.name).group(0)
        target = out / f"{name}_sdepth.npz"
        if target.is_file():
            continue
        try:
            video = render_video(read_skeleton(f), points_per_frame, samples_per_frame, video_seed(name, seed))
        except DataFormatError:
            raise
        except ValueError as e:  # e.g. a tracked frame with every joint behind the camera: nothing to see
            raise DataFormatError(f"{f}: cannot render this skeleton sequence: {e}") from None
        if video is not None and not np.isfinite(video).all():
            raise DataFormatError(f"{f}: rendering gave NaN/inf points (joint coordinates far outside a room?)")
        if video is None:
            skipped.append(f.name)
            continue
        _atomic_savez(target, point_clouds=video)
        if (i + 1) % 50 == 0:
            log.info("rendered %d / %d", i + 1, len(files))
    (out / "manifest.json").write_text(json.dumps({"source": str(skeleton_root), "rendered": len(files) - len(skipped),
                                                   "skipped_never_tracked": skipped, "points_per_frame": points_per_frame,
                                                   "samples_per_frame": samples_per_frame, "seed": seed}, indent=1))
    return out


class PointVideoDataModule(L.LightningDataModule):
    """MSR-Action3D-style point-cloud videos (module docstring), built from ``conf/data/msr_action3d.yaml``.

    Args:
        format: ``npz`` (read ``root``, the MeteorNet/P4Transformer folder) or ``skeleton`` (render
            ``root``'s ``*_skeleton3D.txt`` into ``cache_dir`` once, then read that).
        clip_len, frame_stride, clip_step, num_points: the clips (train); ``test_clip_step`` for test.
        train_subjects: subjects of the training split (the rest are test).
        points_per_frame, samples_per_frame, render_seed: the renderer's (``format: skeleton``).
        load_videos: ``false`` skips rendering/reading the videos (a method that reads only
            :meth:`skeletons`).

    Attributes (after :meth:`setup`): ``train_videos``, ``test_videos`` (lists of frame lists),
    ``train_labels``, ``test_labels`` ``(V,)``, ``num_classes``, ``npz_root``.

    Raises (setup):
        DataNotFoundError: no files. ValueError: a corrupt or malformed file (named).
    """

    def __init__(self, name: str = "msr_action3d", format: str = "skeleton", root: str = "data/msr_action3d/skeleton3D",
                 cache_dir: str = ".cache/lightning_dd", clip_len: int = 24, frame_stride: int = 1, clip_step: int = 1,
                 test_clip_step: int = 1, num_points: int = 2048, batch_size: int = 14, num_workers: int = 0,
                 train_subjects: tuple[int, ...] = (1, 2, 3, 4, 5), jitter: tuple[float, float] = (0.9, 1.1),
                 allow_pickle: bool = False, points_per_frame: int = 2048, samples_per_frame: int = 20000,
                 render_seed: int = 0, num_classes: int = 20, load_videos: bool = True):
        super().__init__()
        if format not in ("npz", "skeleton"):
            raise ValueError(f"data.format must be npz or skeleton, got {format!r}")
        if min(clip_len, frame_stride, clip_step, test_clip_step, num_points, batch_size) < 1:
            raise ValueError("data: clip_len, frame_stride, clip_step, test_clip_step, num_points, batch_size must be >= 1")
        self.name, self.format, self.root, self.cache_dir = name, format, Path(root), Path(cache_dir)
        self.clip_len, self.frame_stride, self.clip_step = clip_len, frame_stride, clip_step
        self.test_clip_step, self.num_points, self.batch_size = test_clip_step, num_points, batch_size
        self.num_workers, self.train_subjects, self.jitter = num_workers, tuple(train_subjects), tuple(jitter)
        self.allow_pickle, self.points_per_frame = allow_pickle, points_per_frame
        self.samples_per_frame, self.render_seed, self.num_classes = samples_per_frame, render_seed, num_classes
        self.load_videos = load_videos
        self.npz_root: Path | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.npz_root is not None or not self.load_videos:
            return
        if self.format == "skeleton":
            self.npz_root = render_skeleton_folder(self.root, self.cache_dir, self.points_per_frame,
                                                   self.samples_per_frame, self.render_seed)
        else:
            self.npz_root = self.root
        data = PointVideos(self.npz_root, self.allow_pickle)
        train = torch.tensor([int(s) in self.train_subjects for s in data.subjects])
        if int(data.labels.max()) >= self.num_classes:
            f = data.files[int(data.labels.argmax())]
            raise DataFormatError(f"{f}: label {int(data.labels.max())} (a{int(data.labels.max()) + 1:02d}) >= "
                                  f"data.num_classes={self.num_classes}")
        self.files = data.files
        self.train_videos = [v for v, k in zip(data.videos, train) if k]
        self.test_videos = [v for v, k in zip(data.videos, train) if not k]
        self.train_labels, self.test_labels = data.labels[train], data.labels[~train]
        log.info("%s: %d train / %d test videos from %s", self.name, len(self.train_videos), len(self.test_videos),
                 self.npz_root)

    def labelled_subset(self, fraction: float, seed: int) -> torch.Tensor:
        """Indices of ``round(fraction * n_c)`` (at least 1) training videos per class, seeded."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for c in self.train_labels.unique():
            idx = (self.train_labels == c).nonzero().squeeze(1)
            k = max(1, round(fraction * len(idx)))
            out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
        return torch.cat(out).sort().values

    def clips(self, split: str = "train", videos: torch.Tensor | None = None, train: bool | None = None,
              views: int = 1) -> ClipDataset:
        """The :class:`ClipDataset` of a split (``videos``: a subset of its video indices); training
        videos shorter than a clip give none (the reference's), test videos one (module docstring)."""
        vids, labels = (self.train_videos, self.train_labels) if split == "train" else (self.test_videos, self.test_labels)
        if videos is not None:
            vids, labels = [vids[i] for i in videos.tolist()], labels[videos]
        is_train = split == "train" if train is None else train
        return ClipDataset(vids, labels, self.clip_len, self.frame_stride,
                           self.clip_step if is_train else self.test_clip_step, self.num_points, is_train,
                           self.jitter, views=views, pad_short=split != "train")

    def loader(self, ds: ClipDataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=drop_last and len(ds) > self.batch_size, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.clips("train"), shuffle=True, drop_last=True)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.clips("test"), shuffle=False)

    def skeletons(self) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
        """``format: skeleton`` only: the real joint sequences ``(T, 20, 3)`` metres (untracked frames
        filled by the nearest tracked one; never-tracked files left out), labels and subjects."""
        from lightning_dd.data.skeleton_render import fill_untracked

        if self.format != "skeleton":
            raise ValueError("skeletons() needs data.format=skeleton")
        seqs, labels, subjects = [], [], []
        for f in sorted(self.root.glob("a*_s*_e*_skeleton3D.txt")):
            j = fill_untracked(read_skeleton(f))
            if j is None:
                continue
            lab, sub, _ = parse_video_name(f)
            seqs.append(j[..., :3])
            labels.append(lab)
            subjects.append(sub)
        return seqs, torch.tensor(labels), torch.tensor(subjects)
