"""Embedded default data set: procedurally generated videos whose class is the direction of motion.

Each clip shows one shape (disk or square, random size, a random colour brighter than the random
background colour) with per-frame pixel noise, moving at a random speed to the right, left, down or up (4 classes), with a small
random drift across the other axis. Motion wraps around the frame edges (the frame is a torus) and the
start position is uniform, so every single frame, and even the unordered set of frames, has the same
distribution for all classes: only the ORDER of the frames tells the classes apart. A frame-averaging
(bag of frames) model stays at chance (25%); the model must use temporal modelling (UniFormerV2's DPE and
local temporal MHRA see neighbouring frames).

Every sample is a pure function of (seed, split, epoch, index) through ``np.random.default_rng``, so
data loader workers and distributed ranks produce identical clips for the same index, nothing is
downloaded or stored, and resuming training reproduces the data exactly. The training split draws new
clips every epoch (``resample_each_epoch``); evaluation splits are fixed.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import MEAN, STD

CLASSES = ("moving right", "moving left", "moving down", "moving up")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def render_clip(rng: np.random.Generator, label: int, num_frames: int = 8, resolution: int = 32,
                noise: float = 12.0) -> np.ndarray:
    """One clip, uint8 (T, H, W, 3). ``label``: 0 right, 1 left, 2 down, 3 up."""
    size = resolution
    unit = size / 32.0
    radius = rng.uniform(3.0, 6.0) * unit
    speed = rng.uniform(1.2, 2.5) * unit  # pixels per frame along the class axis
    drift = rng.uniform(-0.35, 0.35) * unit  # pixels per frame across it
    square = rng.random() < 0.5
    background = rng.uniform(0, 120, size=3)
    colour = np.clip(background + rng.uniform(70, 160, size=3), 0, 255)  # always brighter than the background
    axis_sign = {0: (1.0, 0.0), 1: (-1.0, 0.0), 2: (0.0, 1.0), 3: (0.0, -1.0)}[int(label)]
    vx = axis_sign[0] * speed + (drift if axis_sign[0] == 0 else 0.0)
    vy = axis_sign[1] * speed + (drift if axis_sign[1] == 0 else 0.0)
    cx, cy = rng.uniform(0, size, size=2)

    coords = np.arange(size, dtype=np.float64) + 0.5
    frames = np.empty((num_frames, size, size, 3), dtype=np.float64)
    for t in range(num_frames):
        px, py = (cx + vx * t) % size, (cy + vy * t) % size
        dx = (coords[None, :] - px + size / 2) % size - size / 2
        dy = (coords[:, None] - py + size / 2) % size - size / 2
        dist = np.maximum(np.abs(dx), np.abs(dy)) if square else np.sqrt(dx * dx + dy * dy)
        alpha = np.clip(radius + 0.5 - dist, 0.0, 1.0)[..., None]
        frames[t] = background * (1 - alpha) + colour * alpha
    frames += rng.normal(0.0, noise, size=frames.shape)
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


class MovingShapes(torch.utils.data.Dataset):
    """Synthetic motion-direction videos; items are dicts like ``data.VideoListDataset``'s.

    ``video``: float (3, T, H, W) normalised with 0.45 / 0.225; labels are balanced (index % 4).
    With ``num_views > 1`` (evaluation) the same clip is repeated as (V, 3, T, H, W) so the multi-view
    code paths can be exercised; the views are identical because the clips are already centred.
    """

    num_classes = len(CLASSES)
    classes = CLASSES

    def __init__(self, size: int = 4096, num_frames: int = 8, resolution: int = 32, split: str = "train",
                 seed: int = 0, noise: float = 12.0, resample_each_epoch: bool | None = None,
                 num_views: int = 0):
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.num_frames = num_frames
        self.resolution = resolution
        self.split = split
        self.seed = seed
        self.noise = noise
        self.resample_each_epoch = split == "train" if resample_each_epoch is None else resample_each_epoch
        self.num_views = num_views
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def clip(self, index: int) -> tuple[np.ndarray, int]:
        epoch = self.epoch if self.resample_each_epoch else 0
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], epoch, index])
        label = index % self.num_classes
        return render_clip(rng, label, self.num_frames, self.resolution, self.noise), label

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        frames, label = self.clip(index)
        video = torch.from_numpy(frames).float().div_(255.0).sub_(MEAN).div_(STD).permute(3, 0, 1, 2)
        video = video.contiguous()
        if self.num_views > 0:
            video = video.unsqueeze(0).expand(self.num_views, *video.shape).contiguous()
        return {"video": video, "label": label, "index": index, "failed": []}


def write_videos(out_dir: str, count: int, num_frames: int = 16, resolution: int = 48, seed: int = 0,
                 codec: str = "mpeg4", fps: int = 10, split: str = "train") -> tuple[str, str]:
    """Encode ``count`` synthetic clips as mp4 files plus a ``path label`` list file and a label file.

    Handy to try the real-video pipeline end to end without a download. Returns (list_file, labels_file).
    """
    import os

    import av

    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], 0, i])
        label = i % len(CLASSES)
        frames = render_clip(rng, label, num_frames, resolution)
        name = f"{split}_{i:05d}.mp4"
        with av.open(os.path.join(out_dir, name), "w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = resolution, resolution, "yuv420p"
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        lines.append(f"{name} {label}")
    list_file = os.path.join(out_dir, f"{split}.txt")
    with open(list_file, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    labels_file = os.path.join(out_dir, "labels.txt")
    with open(labels_file, "w") as fh:
        fh.write("\n".join(CLASSES) + "\n")
    return list_file, labels_file
