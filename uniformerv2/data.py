"""Video data: list files, TSN segment sampling, train/test transforms, data sets.

Decoding (PyAV) lives in ``uniformerv2.video``.

Frame sampling follows the official UniFormerV2 "sparse" (TSN) sampling:

- train: the video's frames 0..n-1 are cut into ``T`` segments of ``seg = (n - 1) / T`` frames; from
  segment i a random frame in ``[round(seg * i), round(seg * (i + 1))]`` (both ends included) is taken;
- test: clip ``k`` of ``K`` takes frame ``round(seg * i) + int(seg / (K + 1) * (k + 1))`` from segment i,
  so the K clips sit at fixed, evenly spread offsets inside every segment.

Indices are clamped to ``n - 1``. Pixels are scaled to [0, 1] and normalised with mean 0.45, std 0.225.

Every sample is a dict ``{"video", "label", "index", "failed"}``; ``collate_videos`` stacks them. A video
that cannot be opened or decoded is never fatal: in training the sample is replaced by another video
(chosen deterministically), in testing it is dropped; either way its path and error travel in "failed"
so the caller can report each bad file once (see ``FailureReporter``).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .video import VideoDecodeError, decode_video

logger = logging.getLogger("uniformerv2")

MEAN = 0.45
STD = 0.225


# ----------------------------------------------------------------------------------------------------
# list files


def read_video_list(list_file: str, root: str | None = None) -> list[tuple[str, int]]:
    """Read a ``path label`` list (one video per line; a comma also separates, as in some csv lists).

    Paths are taken relative to ``root`` (default: the list file's folder) unless absolute. Blank lines
    and lines starting with '#' are ignored. The label is the LAST field, so paths may contain spaces.
    """
    if root is None:
        root = os.path.dirname(os.path.abspath(list_file))
    items = []
    with open(list_file) as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "," in line and not re.search(r"\s", line):
                parts = line.rsplit(",", 1)
            else:
                parts = line.rsplit(None, 1)
            if len(parts) < 2:
                raise ValueError(f"{list_file}:{line_no}: expected 'path label', got {line!r}")
            path, label = parts
            try:
                label_int = int(label)
            except ValueError:
                raise ValueError(f"{list_file}:{line_no}: label {label!r} is not an integer") from None
            items.append((path if os.path.isabs(path) else os.path.join(root, path), label_int))
    if not items:
        raise ValueError(f"{list_file}: no videos listed")
    return items


def read_labels(path: str) -> list[str]:
    """Class names: one per line (line i is class i), or 'index name' lines, or a JSON list/dict."""
    if path.endswith(".json"):
        import json

        with open(path) as fh:
            data = json.load(fh)
        if isinstance(data, dict):
            return [data[k] for k in sorted(data, key=lambda k: int(k))] if all(
                str(k).isdigit() for k in data
            ) else [k for k, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
        return [str(x) for x in data]
    with open(path) as fh:
        lines = [ln.rstrip("\n") for ln in fh if ln.strip()]
    if lines and all(re.match(r"^\d+[\s,]+\S", ln) for ln in lines):
        pairs = [re.split(r"[\s,]+", ln.strip(), maxsplit=1) for ln in lines]
        if sorted(int(i) for i, _ in pairs) == list(range(len(pairs))):
            names = [""] * len(pairs)
            for i, name in pairs:
                names[int(i)] = name.strip()
            return names
    return [ln.strip() for ln in lines]


# ----------------------------------------------------------------------------------------------------
# frame sampling


def segment_indices(num_video_frames: int, num_frames: int, clip_index: int = -1, num_clips: int = 1,
                    rng: np.random.Generator | None = None) -> list[int]:
    """Official sparse (TSN) sampling; ``clip_index=-1`` is the random training draw (needs ``rng``)."""
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if clip_index >= num_clips:
        raise ValueError(f"clip_index {clip_index} out of range for num_clips={num_clips}")
    seg = max(0.0, float(num_video_frames - 1) / num_frames)
    last = num_video_frames - 1
    out = []
    for i in range(num_frames):
        start = int(np.round(seg * i))
        if clip_index < 0:
            end = int(np.round(seg * (i + 1)))
            idx = int(rng.integers(start, end + 1))
        else:
            idx = start + int(seg / (num_clips + 1) * (clip_index + 1))
        out.append(min(idx, last))
    return out


# ----------------------------------------------------------------------------------------------------
# transforms (all work on float (T, 3, H, W) in [0, 255]; the same parameters for every frame). A clip is
# ~26 MB of float32 and a DataLoader worker runs one thread: each full-size temporary costs a fresh
# allocation (page faults) on top of its pass, so the ops below work in place on their own intermediates
# (never on their input) and compute exactly what the plain out-of-place forms compute.


def to_float_frames(frames_uint8: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32 in [0, 255]."""
    return frames_uint8.permute(0, 3, 1, 2).float()


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) float in [0, 255] -> (3, T, H, W) normalised with 0.45 / 0.225."""
    return frames.div(255.0).sub_(MEAN).div_(STD).permute(1, 0, 2, 3).contiguous()


def _resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_short_side(frames: torch.Tensor, short_side: int) -> torch.Tensor:
    h, w = frames.shape[-2:]
    if min(h, w) == short_side:
        return frames
    if h <= w:
        size = (short_side, max(short_side, int(round(w * short_side / h))))
    else:
        size = (max(short_side, int(round(h * short_side / w))), short_side)
    return _resize(frames, size)


def uniform_crop(frames: torch.Tensor, size: int, position: int) -> torch.Tensor:
    """Crop ``size`` x ``size``: position 0/1/2 = left/centre/right (top/middle/bottom if taller)."""
    h, w = frames.shape[-2:]
    if h < size or w < size:
        frames = resize_short_side(frames, size)
        h, w = frames.shape[-2:]
    y = (h - size) // 2
    x = (w - size) // 2
    if w >= h:
        x = {0: 0, 1: x, 2: w - size}[position]
    else:
        y = {0: 0, 1: y, 2: h - size}[position]
    return frames[..., y:y + size, x:x + size]


def sample_resized_crop(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The box (y, x, height, width) of an Inception-style crop of an ``h`` x ``w`` frame: area fraction in
    ``scale``, log-uniform aspect in ``ratio`` (ten tries, then a centre crop with the ratio clamped)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return y, x, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(frames: torch.Tensor, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style crop (``sample_resized_crop``), resized to ``size`` x ``size``."""
    y, x, ch, cw = sample_resized_crop(*frames.shape[-2:], rng, scale, ratio)
    return _resize(frames[..., y:y + ch, x:x + cw], (size, size))


# --- RandAugment (timm-style spec "rand-m7-n4-mstd0.5-inc1"), same ops/params for every frame ---

_FILL = MEAN * 255.0


def _blend(a, b, factor):
    """b + (a - b) * factor, clamped to [0, 255]."""
    return (a - b).mul_(factor).add_(b).clamp_(0, 255)


def _gray(x):
    return (x[:, 0:1] * 0.299).add_(x[:, 1:2] * 0.587).add_(x[:, 2:3] * 0.114)


def _affine(x, theta):
    """Every frame through the same affine map (empty area filled with the mean pixel): the frames and
    channels as the channels of one image, so that one sampling grid serves them all. ``x``: a clip
    (T, C, H, W) and one map (2 x 3), or clips (N, T, C, H, W) and one map each (N, 2, 3)."""
    T, C, H, W = x.shape[-4:]
    n = math.prod(x.shape[:-4])
    theta = torch.as_tensor(theta, dtype=x.dtype, device=x.device).reshape(n, 2, 3)
    grid = F.affine_grid(theta, [n, T * C, H, W], align_corners=False)
    centred = (x - _FILL).reshape(n, T * C, H, W)
    out = F.grid_sample(centred, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(x.shape).add_(_FILL)


def _equalize(x):
    """PIL's ImageOps.equalize per frame and channel: every (frame, channel) plane's histogram in one
    bincount, its lookup table, and one gather; a plane with a single value (or whose values all sit in
    its top bin) is left as it is."""
    planes = x.shape[0] * x.shape[1]
    offsets = (torch.arange(planes, dtype=torch.int32, device=x.device) * 256).view(x.shape[0], x.shape[1], 1, 1)
    # (plane, value) -> one bin; int32 and index_select: several times faster than int64 and x[index]
    index = x.round().clamp_(0, 255).to(torch.int32).add_(offsets).flatten()
    hist = torch.bincount(index, minlength=256 * planes).view(planes, 256).float()
    present = hist > 0
    top = 255 - present.flip(1).to(torch.uint8).argmax(dim=1, keepdim=True)  # the highest value present
    step = (hist.sum(dim=1, keepdim=True) - hist.gather(1, top)) / 255
    lut = ((torch.cumsum(hist, 1) - hist + step / 2) / step).floor_().clamp_(0, 255)
    out = lut.flatten().index_select(0, index).view_as(x)
    unchanged = (present.sum(dim=1) <= 1) | (step.squeeze(1) == 0)
    if x.is_cuda or unchanged.any():  # on a GPU a pass costs less than waiting for the answer
        out = torch.where(unchanged.view(x.shape[0], x.shape[1], 1, 1), x, out)
    return out


def _autocontrast(x):
    """Each channel stretched to [0, 255] over the whole clip (a constant channel left as it is); ``x``: a
    clip (T, C, H, W) or clips (N, T, C, H, W)."""
    lead, C = x.shape[:-4], x.shape[-3]
    lo, hi = x.transpose(-4, -3).reshape(*lead, C, -1).aminmax(dim=-1)
    lo, hi = lo.view(*lead, 1, C, 1, 1), hi.view(*lead, 1, C, 1, 1)
    varies = hi > lo
    scale = torch.where(varies, 255.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    return (x - torch.where(varies, lo, torch.zeros_like(lo))).mul_(scale).clamp_(0, 255)


def _blur(x):
    """PIL's SMOOTH filter (3x3, centre weight 5) per frame and channel, edges replicated."""
    k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13.0
    k = k.view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    # the depthwise 3x3 on channels-last memory (decoded clips are; after an affine op or equalize a clip is
    # NCHW): the same values, ~5x faster on one CPU thread than on NCHW
    padded = F.pad(x.contiguous(memory_format=torch.channels_last), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, k, groups=3)


def _sharpness(x, factor):
    return _blend(x, _blur(x), factor)


# RandAugment's ops in two halves: the value an op applies, from its magnitude m in [0, 1] and a sign (+1 or
# -1; the ops in _SIGNED_OPS flip their direction at random, the others ignore it), and the op on a clip given
# that value. The batched transform (uniformerv2/augment.py) takes the same values, so both compute them once.
_RA_VALUE = {
    "AutoContrast": lambda m, s: None,
    "Equalize": lambda m, s: None,
    "Invert": lambda m, s: None,
    "Rotate": lambda m, s: _rot(30.0 * m * s),
    "PosterizeIncreasing": lambda m, s: 4 - int(4 * m),  # bits kept
    "SolarizeIncreasing": lambda m, s: 256 - 256 * m,    # threshold
    "SolarizeAdd": lambda m, s: int(110 * m),            # added below 128
    "ColorIncreasing": lambda m, s: 1.0 + 0.9 * m * s,   # blend factors
    "ContrastIncreasing": lambda m, s: 1.0 + 0.9 * m * s,
    "BrightnessIncreasing": lambda m, s: 1.0 + 0.9 * m * s,
    "SharpnessIncreasing": lambda m, s: 1.0 + 0.9 * m * s,
    "ShearX": lambda m, s: [[1, 0.3 * m * s, 0], [0, 1, 0]],  # affine maps
    "ShearY": lambda m, s: [[1, 0, 0], [0.3 * m * s, 1, 0]],
    "TranslateXRel": lambda m, s: [[1, 0, 0.9 * m * s], [0, 1, 0]],
    "TranslateYRel": lambda m, s: [[1, 0, 0], [0, 1, 0.9 * m * s]],
}
_RA_APPLY = {
    "AutoContrast": lambda x, v: _autocontrast(x),
    "Equalize": lambda x, v: _equalize(x),
    "Invert": lambda x, v: 255.0 - x,
    "Rotate": _affine,
    "PosterizeIncreasing": lambda x, v: _posterize(x, v),
    "SolarizeIncreasing": lambda x, v: _where_into(x >= v, 255.0 - x, x),
    "SolarizeAdd": lambda x, v: _where_into(x < 128, (x + v).clamp_(max=255), x),
    "ColorIncreasing": lambda x, v: _blend(x, _gray(x), v),
    "ContrastIncreasing": lambda x, v: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), v),
    "BrightnessIncreasing": lambda x, v: _blend(x, torch.zeros_like(x), v),
    "SharpnessIncreasing": _sharpness,
    "ShearX": _affine,
    "ShearY": _affine,
    "TranslateXRel": _affine,
    "TranslateYRel": _affine,
}
_SIGNED_OPS = frozenset({"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                         "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
RA_OP_NAMES = tuple(_RA_VALUE)


def ra_op(name: str, frames: torch.Tensor, m: float, sign: float) -> torch.Tensor:
    """One RandAugment op on a clip (T, 3, H, W) float in [0, 255]."""
    return _RA_APPLY[name](frames, _RA_VALUE[name](m, sign))


def _rot(deg):
    a = math.radians(deg)
    return [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]]


def _posterize(x, bits):
    """The top ``bits`` bits of each rounded value (floor division by a power of two is exact in float)."""
    quantum = float(2 ** (8 - max(0, min(8, bits))))
    return x.round().clamp_(0, 255).div_(quantum).floor_().mul_(quantum)


def _where_into(condition, new, x):
    """torch.where(condition, new, x) written into ``new`` (a temporary of the caller's)."""
    return torch.where(condition, new, x, out=new)


@dataclass
class RandAugment:
    """``num_ops`` random ops (with replacement), each applied with probability ``prob``; magnitude
    ``m`` out of 10 with Gaussian noise ``std`` (clipped to [0, 10]). Translations are relative to the
    image size (0.45 at m=10: the affine grid spans 2, hence the 0.9 above)."""

    magnitude: float = 7.0
    num_ops: int = 2
    std: float = 0.5
    prob: float = 0.5

    @classmethod
    def from_spec(cls, spec: str) -> "RandAugment":
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"randaugment spec must start with 'rand-', got {spec!r}")
        kw = {}
        for p in parts[1:]:
            key, val = re.match(r"([a-z]+)([\d.]+)$", p).groups()
            if key == "m":
                kw["magnitude"] = float(val)
            elif key == "n":
                kw["num_ops"] = int(val)
            elif key == "mstd":
                kw["std"] = float(val)
            elif key == "p":
                kw["prob"] = float(val)
            elif key == "inc":
                if int(val) != 1:
                    raise ValueError("only the increasing op set (inc1) is implemented")
            else:
                raise ValueError(f"unknown randaugment field {p!r} in {spec!r}")
        return cls(**kw)

    def sample(self, rng: np.random.Generator) -> list[tuple[str, float, float]]:
        """The ops one clip gets, in order: (op name, magnitude in [0, 1], sign +1 or -1)."""
        ops = []
        for k in rng.integers(0, len(RA_OP_NAMES), size=self.num_ops):
            if rng.random() > self.prob:
                continue
            m = self.magnitude if self.std <= 0 else rng.normal(self.magnitude, self.std)
            m = float(np.clip(m, 0.0, 10.0)) / 10.0
            name = RA_OP_NAMES[k]
            sign = (1.0 if rng.random() < 0.5 else -1.0) if name in _SIGNED_OPS else 1.0
            ops.append((name, m, sign))
        return ops

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return apply_randaugment(frames, self.sample(rng))


def apply_randaugment(frames: torch.Tensor, ops: list[tuple[str, float, float]]) -> torch.Tensor:
    for name, m, sign in ops:
        frames = ra_op(name, frames, m, sign)
    return frames


@dataclass
class TrainParams:
    """The random choices of one training clip's transform (``TrainTransform.sample``)."""

    ops: list          # RandAugment: (op name, magnitude in [0, 1], sign)
    box: tuple         # random resized crop (y, x, height, width) in the decoded frame
    flip: bool


@dataclass
class TrainTransform:
    crop_size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment: str | None = None

    def sample(self, height: int, width: int, rng: np.random.Generator) -> TrainParams:
        """Every random choice for a clip of ``height`` x ``width`` frames, drawn from ``rng`` in the order the
        transform has always drawn them (the GPU transform, uniformerv2/augment.py, applies the same)."""
        ops = RandAugment.from_spec(self.randaugment).sample(rng) if self.randaugment else []
        box = sample_resized_crop(height, width, rng, tuple(self.scale), tuple(self.ratio))
        return TrainParams(ops, box, bool(self.flip and rng.random() < 0.5))

    def apply(self, frames_uint8: torch.Tensor, params: TrainParams) -> torch.Tensor:
        x = apply_randaugment(to_float_frames(frames_uint8), params.ops)
        y, x0, ch, cw = params.box
        x = _resize(x[..., y:y + ch, x0:x0 + cw], (self.crop_size, self.crop_size))
        if params.flip:
            x = x.flip(-1)
        return normalize(x)

    def __call__(self, frames_uint8: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(frames_uint8, self.sample(*frames_uint8.shape[1:3], rng))


@dataclass
class TestTransform:
    crop_size: int
    short_side: int | None = None  # default: crop_size (as in the official test)
    num_crops: int = 1

    def __call__(self, frames_uint8: torch.Tensor) -> list[torch.Tensor]:
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {self.num_crops}")
        x = resize_short_side(to_float_frames(frames_uint8), self.short_side or self.crop_size)
        positions = [1] if self.num_crops == 1 else [0, 1, 2]
        return [normalize(uniform_crop(x, self.crop_size, p)) for p in positions]


def decode_train_clip(path: str, num_frames: int, rng: np.random.Generator) -> torch.Tensor:
    """The frames of one training clip, a random sparse (TSN) draw from ``rng``: uint8 (T, H, W, 3)."""
    frames, rows = decode_video(path, lambda n: segment_indices(n, num_frames, -1, 1, rng))
    if rows == list(range(len(frames))):  # T distinct frames (the usual draw): the decoded tensor is the clip
        return frames
    return frames[rows]


def decode_test_clips(path: str, num_frames: int, num_clips: int) -> torch.Tensor:
    """The frames of every test clip of one video: uint8 (num_clips, T, H, W, 3)."""

    def index_fn(n):
        out = []
        for k in range(num_clips):
            out += segment_indices(n, num_frames, k, num_clips)
        return out

    frames, rows_all = decode_video(path, index_fn)
    return frames[rows_all].view(num_clips, num_frames, *frames.shape[1:])


def load_test_views(path: str, num_frames: int, num_clips: int, transform: TestTransform) -> torch.Tensor:
    """All test views of one video: (num_clips * num_crops, 3, T, S, S), clip-major."""
    clips = decode_test_clips(path, num_frames, num_clips)
    return torch.stack([view for clip in clips for view in transform(clip)])


@dataclass
class DecodedClip:
    """What a worker returns when the batched transform (uniformerv2/augment.py) runs after it: uint8
    frames, (T, H, W, 3) for training or (num_clips, T, H, W, 3) for testing, and a training clip's random
    choices, drawn as the CPU transform would have drawn them."""

    frames: torch.Tensor
    params: TrainParams | None = None


# ----------------------------------------------------------------------------------------------------
# datasets


class VideoListDataset(torch.utils.data.Dataset):
    """Videos from a ``path label`` list file.

    train=True: one randomly sampled, augmented clip per item, (3, T, S, S). The randomness is a pure
    function of (seed, epoch, index), so results do not depend on worker count, rank or resumption.
    train=False: all ``num_clips * num_crops`` test views of the video, (V, 3, T, S, S).
    raw_frames=True: a ``DecodedClip`` instead (uint8 frames; the transform runs on the batch, augment.py).
    """

    def __init__(self, list_file: str, num_frames: int = 8, train: bool = True, crop_size: int = 224,
                 short_side: int | None = None, num_clips: int = 1, num_crops: int = 1,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                 randaugment: str | None = None, root: str | None = None, seed: int = 0,
                 max_retries: int = 10, raw_frames: bool = False):
        self.items = read_video_list(list_file, root)
        self.num_frames = num_frames
        self.train = train
        self.num_clips = num_clips
        self.seed = seed
        self.epoch = 0
        self.max_retries = max_retries
        self.raw_frames = raw_frames  # return DecodedClip: the transform runs on the batch (augment.py)
        self.train_transform = TrainTransform(crop_size, tuple(scale), tuple(ratio), flip, randaugment)
        self.test_transform = TestTransform(crop_size, short_side, num_crops)
        self._bad: dict[int, str] = {}  # per-process memo of unreadable items
        self.num_classes = max(label for _, label in self.items) + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int, rng):
        path, label = self.items[index]
        if self.train:
            frames = decode_train_clip(path, self.num_frames, rng)
            if self.raw_frames:
                return DecodedClip(frames, self.train_transform.sample(*frames.shape[1:3], rng)), label
            return self.train_transform(frames, rng), label
        if self.raw_frames:
            return DecodedClip(decode_test_clips(path, self.num_frames, self.num_clips)), label
        return load_test_views(path, self.num_frames, self.num_clips, self.test_transform), label

    def __getitem__(self, index: int) -> dict:
        failed = []
        tried = index
        for attempt in range(self.max_retries if self.train else 1):
            if tried not in self._bad:
                rng = np.random.default_rng([self.seed, self.epoch, tried, attempt])
                try:
                    video, label = self._load(tried, rng)
                    return {"video": video, "label": label, "index": tried, "failed": failed}
                except VideoDecodeError as exc:
                    self._bad[tried] = str(exc)
            failed.append((self.items[tried][0], self._bad[tried]))
            # deterministic replacement (a large odd stride visits every index)
            tried = (tried + 7919 * (attempt + 1)) % len(self.items)
        if self.train:
            raise RuntimeError(f"{self.max_retries} videos in a row could not be decoded, starting at "
                               f"{self.items[index][0]}: {failed[0][1]}")
        return {"video": None, "label": self.items[index][1], "index": index, "failed": failed}


def stack_for_the_loader(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; in a DataLoader worker, into shared memory, as ``default_collate`` does: the batch then
    goes to the main process without the copy into shared memory that sending it would make."""
    if torch.utils.data.get_worker_info() is None or tensors[0].device.type != "cpu":
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.numel() * first.element_size())
    out = first.new_empty(0).set_(storage).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def collate_videos(batch: list[dict], stack=stack_for_the_loader) -> dict:
    """Stack samples; drop those whose video is None (unreadable, test mode). video is None if empty.
    ``stack`` joins the videos (``augment.collate_decoded_clips`` passes its own for ``DecodedClip`` items)."""
    failed = [f for item in batch for f in item["failed"]]
    good = [item for item in batch if item["video"] is not None]
    video = stack([b["video"] for b in good]) if good else None
    return {
        "video": video,
        "label": torch.tensor([b["label"] for b in good], dtype=torch.long),
        "index": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "failed": failed,
    }


class FailureReporter:
    """Logs each unreadable video once per process (the samples carry their failures to the caller)."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, failed) -> None:
        for path, err in failed:
            if path not in self.seen:
                self.seen.add(path)
                logger.warning("skipping unreadable video %s (%s)", path, err)
