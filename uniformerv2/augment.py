"""The training and test transforms of ``uniformerv2/data.py`` applied to a whole batch, on its device.

With ``data.augment_on=gpu`` (``auto``: when training on CUDA) the DataLoader workers only decode: each
returns uint8 frames and, for training, the clip's random choices (``TrainTransform.sample``, drawn from the
same per-item generator and in the same order as the CPU transform draws them, so a seed gives the same
parameters either way). ``ClipBatch.collate`` groups a batch's clips by frame size (a video list holds a few
sizes; one group per size keeps every op a plain batched tensor op) and holds the parameters as tensors; the
training step copies the uint8 frames from pinned memory and runs the transform there:

- RandAugment: for each of the ``num_ops`` slots, each op the batch drew runs once on the clips that drew it
  (a loop over the 15 ops, not over clips), with per-clip values (blend factors, thresholds, affine maps);
  the ops are ``data.py``'s own, taking the values as tensors;
- random resized crop + flip + normalisation: the crop's antialiased bilinear resize (PyTorch's, as
  ``F.interpolate(antialias=True)`` computes it) as two batched matrix products with per-clip weights, the
  flip folded into the horizontal weights;
- test views: the short-side resize and the 1 or 3 crops the same way.

Everything works on CPU tensors too (the tests compare it with the CPU transform there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import data as D

AUGMENT_ON = ("cpu", "gpu", "auto")
_AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_OP_INDEX = {name: i for i, name in enumerate(D.RA_OP_NAMES)}
_AFFINE = -2  # the op index that stands for all affine ops of a slot (one sampling grid per clip)


def resolve_augment_on(cfg: dict, device: torch.device) -> str:
    """``cpu`` (the workers transform each clip) or ``gpu`` (the step transforms the batch on ``device``)
    from ``data.augment_on``; the synthetic data set renders its clips and has no transform to move."""
    value = cfg["data"].get("augment_on", "auto")
    if value not in AUGMENT_ON:
        raise ValueError(f"config data.augment_on={value!r}: expected one of {', '.join(AUGMENT_ON)}")
    if cfg["data"]["dataset"] != "video_list":
        return "cpu"
    if value == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return value


# ----------------------------------------------------------------------------------------------------
# the batch


def _op_value(name: str, m: float, sign: float) -> list[float]:
    """An op's value (``data._RA_VALUE``) as 6 numbers: a scalar first, an affine map's 6 entries."""
    value = D._RA_VALUE[name](m, sign)
    if value is None:
        return [0.0] * 6
    if isinstance(value, list):
        return [float(v) for row in value for v in row]
    return [float(value)] + [0.0] * 5


@dataclass
class ClipBatch:
    """A batch of decoded clips on its way to ``train_views`` / ``test_views``.

    ``groups[g]``: uint8 (n_g, T, H, W, 3) (training) or (n_g, K, T, H, W, 3) (K test clips per video), one
    frame size per group; ``rows[g]``: the batch positions of that group's clips. Training parameters, one
    row per clip: ``op_index`` (N, num_ops) index into ``data.RA_OP_NAMES`` (-1: the slot drew no op; kept on
    the host, where it decides which ops run), ``op_value`` (N, num_ops, 6) float32, ``box`` (N, 4)
    float64 crop (y, x, height, width), ``flip`` (N,) bool."""

    groups: list
    rows: list
    op_index: torch.Tensor | None = None
    op_value: torch.Tensor | None = None
    box: torch.Tensor | None = None
    flip: torch.Tensor | None = None

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def train(self) -> bool:
        return self.box is not None

    @classmethod
    def collate(cls, clips: list) -> "ClipBatch":
        """From the workers' ``data.DecodedClip`` items (all training or all test)."""
        by_size: dict[tuple, list[int]] = {}
        for i, clip in enumerate(clips):
            by_size.setdefault(tuple(clip.frames.shape), []).append(i)
        groups = [D.stack_for_the_loader([clips[i].frames for i in rows]) for rows in by_size.values()]
        rows = [torch.tensor(r, dtype=torch.long) for r in by_size.values()]
        if clips[0].params is None:
            return cls(groups, rows)
        slots = max(len(c.params.ops) for c in clips)
        op_index = torch.full((len(clips), slots), -1, dtype=torch.long)
        op_value = torch.zeros(len(clips), slots, 6, dtype=torch.float64)
        for i, clip in enumerate(clips):
            for k, (name, m, sign) in enumerate(clip.params.ops):
                op_index[i, k] = _OP_INDEX[name]
                op_value[i, k] = torch.tensor(_op_value(name, m, sign), dtype=torch.float64)
        box = torch.tensor([c.params.box for c in clips], dtype=torch.float64)
        flip = torch.tensor([c.params.flip for c in clips], dtype=torch.bool)
        return cls(groups, rows, op_index, op_value.float(), box, flip)

    def _map(self, fn) -> "ClipBatch":
        def opt(t):
            return None if t is None else fn(t)

        return ClipBatch([fn(g) for g in self.groups], self.rows, self.op_index, opt(self.op_value),
                         opt(self.box), opt(self.flip))

    def pin_memory(self) -> "ClipBatch":
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device, non_blocking: bool = False) -> "ClipBatch":
        """The frames and parameters on ``device`` (``op_index`` and ``rows`` stay on the host)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def collate_decoded_clips(batch: list[dict]) -> dict:
    """The DataLoader's collate for ``raw_frames`` data sets: ``data.collate_videos`` with a ``ClipBatch``."""
    return D.collate_videos(batch, stack=ClipBatch.collate)


def collate_fn(dataset):
    """The collate function for ``dataset``'s samples: decoded clips (``raw_frames``) or finished ones."""
    return collate_decoded_clips if getattr(dataset, "raw_frames", False) else D.collate_videos


# ----------------------------------------------------------------------------------------------------
# resampling


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """(N, out_size, in_size) float32 weights that resize each window ``[start, start + length)`` of a line of
    ``in_size`` pixels to ``out_size`` pixels as ``F.interpolate(mode="bilinear", antialias=True,
    align_corners=False)`` does: a triangle filter widened by the downscale factor, centred on each output
    pixel's centre, truncated to the window and normalised (an identity where the sizes are equal)."""
    start, length = start.double(), length.double()
    scale = (length / out_size)[:, None, None]
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, dtype=torch.float64, device=start.device)[None, :, None] + 0.5)
    lo = (center - support + 0.5).trunc().clamp_min(0)
    hi = torch.minimum((center + support + 0.5).trunc(), length[:, None, None])
    j = torch.arange(in_size, dtype=torch.float64, device=start.device)[None, None, :] - start[:, None, None]
    w = (1 - ((j - center + 0.5) * invscale).abs()).clamp_min(0)
    w = torch.where((j >= lo) & (j < hi), w, torch.zeros_like(w))
    return (w / w.sum(-1, keepdim=True)).float()


def _resample(x: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """(N, T, C, H, W) float -> (N, T, C, S_y, S_x): rows by ``wy`` (N, S_y, H), columns by ``wx`` (N, S_x, W)."""
    n, t, c, h, w = x.shape
    planes = x.reshape(n, t * c, h, w)
    out = torch.matmul(torch.matmul(wy[:, None], planes), wx.transpose(1, 2)[:, None])
    return out.view(n, t, c, wy.shape[1], wx.shape[1])


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """(N, T, 3, H, W) in [0, 255] -> (N, 3, T, H, W) normalised as ``data.normalize``."""
    return x.div(255.0).sub_(D.MEAN).div_(D.STD).transpose(1, 2).contiguous()


def _float_frames(frames_uint8: torch.Tensor) -> torch.Tensor:
    """(..., T, H, W, 3) uint8 -> (..., T, 3, H, W) float32 in [0, 255]."""
    return frames_uint8.movedim(-1, -3).float()


# ----------------------------------------------------------------------------------------------------
# RandAugment


def _apply_op(op: int, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One RandAugment op (``op`` an index into ``data.RA_OP_NAMES``, or _AFFINE) on clips (n, T, C, H, W),
    each with its own value (n, 6)."""
    n, t = x.shape[:2]
    if op == _AFFINE:
        return D._affine(x, value.view(n, 2, 3))
    name = D.RA_OP_NAMES[op]
    if name == "AutoContrast":  # over the whole clip
        return D._autocontrast(x)
    if name == "PosterizeIncreasing":
        quantum = torch.exp2(8 - value[:, 0].clamp(0, 8)).view(n, 1, 1, 1, 1)
        return x.round().clamp_(0, 255).div_(quantum).floor_().mul_(quantum)
    # the rest work frame by frame: the frames of all clips as one clip, each frame with its clip's value
    per_frame = value[:, 0].repeat_interleave(t).view(n * t, 1, 1, 1)
    return D._RA_APPLY[name](x.flatten(0, 1), per_frame).view(x.shape)


def _randaugment(x: torch.Tensor, op_index: torch.Tensor, op_value: torch.Tensor) -> torch.Tensor:
    """Each clip's ops in its slot order; per slot, each op once on the clips that drew it. ``x`` is a
    temporary of the caller's: the results of ops that only some clips drew are written into it."""
    kinds = op_index.clone()
    for name in _AFFINE_OPS:
        kinds[kinds == _OP_INDEX[name]] = _AFFINE
    for slot in range(kinds.shape[1]):
        column = kinds[:, slot]
        for op in column.unique().tolist():
            if op == -1:
                continue
            chosen = (column == op).nonzero().flatten()
            if len(chosen) == len(column):
                x = _apply_op(op, x, op_value[:, slot])
                continue
            rows = chosen.to(x.device)
            x.index_copy_(0, rows, _apply_op(op, x.index_select(0, rows), op_value.index_select(0, rows)[:, slot]))
    return x


# ----------------------------------------------------------------------------------------------------
# the transforms


def train_views(batch: ClipBatch, crop_size: int) -> torch.Tensor:
    """``data.TrainTransform`` on every clip with its own parameters: (N, 3, T, S, S) float32, normalised."""
    if not batch.train:
        raise ValueError("train_views needs a batch of training clips (with their parameters)")
    device = batch.groups[0].device
    first = batch.groups[0]
    out = torch.empty(len(batch), 3, first.shape[1], crop_size, crop_size, device=device)
    for frames, rows in zip(batch.groups, batch.rows):
        h, w = frames.shape[2:4]
        rows_dev = rows.to(device)
        x = _float_frames(frames)
        if batch.op_index.shape[1]:
            x = _randaugment(x, batch.op_index[rows], batch.op_value.index_select(0, rows_dev))
        box = batch.box.index_select(0, rows_dev)
        wy = resample_weights(box[:, 0], box[:, 2], crop_size, h)
        wx = resample_weights(box[:, 1], box[:, 3], crop_size, w)
        flip = batch.flip.index_select(0, rows_dev).view(-1, 1, 1)
        wx = torch.where(flip, wx.flip(1), wx)  # a flipped crop: its output columns in reverse order
        out[rows_dev] = _normalize(_resample(x, wy, wx))
    return out


def _short_side_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """The frame size after ``data.resize_short_side``."""
    if min(h, w) == short_side:
        return h, w
    if h <= w:
        return short_side, max(short_side, int(round(w * short_side / h)))
    return max(short_side, int(round(h * short_side / w))), short_side


def _line_weights(size: int, resized: list[int], crop_start: int, crop_size: int, device) -> torch.Tensor:
    """(crop_size, size) weights: a line of ``size`` pixels resized in turn to each of ``resized``, then the
    ``crop_size`` pixels from ``crop_start`` taken."""
    w = torch.eye(size, device=device)
    for new in resized:
        one = torch.zeros(1, device=device)
        w = resample_weights(one, one + w.shape[0], new, w.shape[0])[0] @ w
    return w[crop_start:crop_start + crop_size]


def test_views(batch: ClipBatch, crop_size: int, short_side: int | None = None, num_crops: int = 1) -> torch.Tensor:
    """``data.TestTransform`` on every test clip: (N, K * num_crops, 3, T, S, S), clip-major as
    ``data.load_test_views``."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    device = batch.groups[0].device
    n_clips, t = batch.groups[0].shape[1:3]
    out = torch.empty(len(batch), n_clips * num_crops, 3, t, crop_size, crop_size, device=device)
    positions = [1] if num_crops == 1 else [0, 1, 2]
    for frames, rows in zip(batch.groups, batch.rows):
        h, w = frames.shape[3:5]
        sizes = [(h, w), _short_side_size(h, w, short_side or crop_size)]
        if min(sizes[-1]) < crop_size:  # uniform_crop resizes once more
            sizes.append(_short_side_size(*sizes[-1], crop_size))
        ys, xs = [s[0] for s in sizes[1:] if s != (h, w)], [s[1] for s in sizes[1:] if s != (h, w)]
        rh, rw = sizes[-1]
        x = _float_frames(frames.flatten(0, 1))  # (videos * clips, T, 3, H, W)
        views = []
        for p in positions:
            y0, x0 = (rh - crop_size) // 2, (rw - crop_size) // 2
            if rw >= rh:
                x0 = {0: 0, 1: x0, 2: rw - crop_size}[p]
            else:
                y0 = {0: 0, 1: y0, 2: rh - crop_size}[p]
            wy = _line_weights(h, ys, y0, crop_size, device).expand(len(x), -1, -1)
            wx = _line_weights(w, xs, x0, crop_size, device).expand(len(x), -1, -1)
            views.append(_normalize(_resample(x, wy, wx)))
        stacked = torch.stack(views, 1).view(len(rows), n_clips * num_crops, 3, t, crop_size, crop_size)
        out[rows.to(device)] = stacked
    return out


def to_device(video, device: torch.device, cfg: dict, train: bool) -> torch.Tensor:
    """A loader batch's ``video`` on ``device``, ready for the model: a tensor is copied as it is; a
    ``ClipBatch`` (``data.augment_on=gpu``) is copied as uint8 and transformed there with ``cfg``'s data
    and eval settings. The copies are asynchronous from pinned memory (the loader's ``pin_memory``)."""
    if not isinstance(video, ClipBatch):
        return video.to(device, non_blocking=True)
    video = video.to(device, non_blocking=True)
    d = cfg["data"]
    if train:
        return train_views(video, int(d["crop_size"]))
    return test_views(video, int(d["crop_size"]), d["short_side"], int(cfg["eval"]["num_crops"]))
