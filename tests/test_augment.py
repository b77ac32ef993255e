"""The batched transforms (uniformerv2/augment.py) against the per-clip CPU transforms of uniformerv2/data.py:
per op on fixed parameters, the crop/resize/flip, the test views, the parameters a seed gives, and the
real-video data set both ways."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniformerv2 import augment as A
from uniformerv2 import data as D

# values are in [0, 255]: interpolation (a resize as matrix products, in another summation order) may differ
# from F.interpolate / grid_sample by float rounding, nothing more
RESAMPLE_ATOL = 2e-3


def _clips(n, t=3, h=21, w=26, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, h, w, 3), dtype=torch.uint8, generator=gen)


def _values(name, ms, signs):
    return torch.tensor([A._op_value(name, m, s) for m, s in zip(ms, signs)], dtype=torch.float32)


@pytest.mark.parametrize("name", D.RA_OP_NAMES)
def test_every_randaugment_op_equals_the_cpu_op_per_clip(name):
    frames = _clips(3)
    x = A._float_frames(frames)
    x[2] = x[2].clamp(40, 90)  # a narrow range: autocontrast and equalize stretch it
    ms, signs = [0.15, 0.62, 0.93], [1.0, -1.0, 1.0]
    op = A._AFFINE if name in A._AFFINE_OPS else A._OP_INDEX[name]
    before = x.clone()
    got = A._apply_op(op, x.clone(), _values(name, ms, signs))
    assert torch.equal(x, before)
    for i in range(3):
        want = D.ra_op(name, D.to_float_frames(frames[i]) if i < 2 else before[2].clone(), ms[i], signs[i])
        atol = RESAMPLE_ATOL if name in A._AFFINE_OPS else 0
        torch.testing.assert_close(got[i], want, rtol=0, atol=atol, msg=f"{name}, clip {i}")


def test_randaugment_slots_run_each_clips_own_ops_in_order():
    tf = D.TrainTransform(16, randaugment="rand-m9-n3-mstd0.5-inc1")
    frames = _clips(12, seed=1)
    params = [tf.sample(21, 26, np.random.default_rng(s)) for s in range(12)]
    assert len({tuple(o[0] for o in p.ops) for p in params}) > 6  # the clips drew different op sequences
    batch = A.ClipBatch.collate([D.DecodedClip(f, p) for f, p in zip(frames, params)])
    got = A._randaugment(A._float_frames(frames), batch.op_index, batch.op_value)
    for i, p in enumerate(params):
        want = D.apply_randaugment(D.to_float_frames(frames[i]), p.ops)
        torch.testing.assert_close(got[i], want, rtol=0, atol=RESAMPLE_ATOL, msg=f"clip {i}: {p.ops}")


@pytest.mark.parametrize("out_size", [7, 16, 40])
def test_resample_weights_are_antialiased_bilinear_interpolation(out_size):
    line = torch.rand(2, 5, 50) * 255  # two clips, five lines of 50 pixels
    start, length = torch.tensor([3, 0]), torch.tensor([29, 50])
    w = A.resample_weights(start, length, out_size, 50)
    got = torch.einsum("nsi,nli->nls", w, line)
    for i in range(2):
        window = line[i, :, start[i]:start[i] + length[i]]
        want = F.interpolate(window[None, None], size=(5, out_size), mode="bilinear", antialias=True,
                             align_corners=False)[0, 0]
        torch.testing.assert_close(got[i], want, rtol=0, atol=RESAMPLE_ATOL)
    assert torch.equal(A.resample_weights(torch.tensor([0]), torch.tensor([9]), 9, 9)[0], torch.eye(9))


def test_crop_flip_normalise_equal_the_cpu_transform_across_frame_sizes():
    tf = D.TrainTransform(24, scale=(0.05, 1.0))
    clips, want = [], []
    for s in range(10):
        frames = _clips(1, t=4, h=30 if s % 3 else 44, w=41 if s % 3 else 20, seed=s)[0]
        params = tf.sample(*frames.shape[1:3], np.random.default_rng(s))
        clips.append(D.DecodedClip(frames, params))
        want.append(tf.apply(frames, params))
    batch = A.ClipBatch.collate(clips)
    assert len(batch.groups) == 2 and batch.flip.any() and not batch.flip.all()
    got = A.train_views(batch, 24)
    assert got.dtype == torch.float32 and got.shape == (10, 3, 4, 24, 24)
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=RESAMPLE_ATOL / 255 / D.STD)


@pytest.mark.parametrize("short_side,num_crops", [(26, 3), (None, 1), (20, 3)])
def test_test_views_equal_the_cpu_views(short_side, num_crops):
    tf = D.TestTransform(24, short_side, num_crops)
    videos = [_clips(2, t=3, h=30, w=41, seed=s) for s in range(3)] + [_clips(2, t=3, h=50, w=27, seed=9)]
    batch = A.ClipBatch.collate([D.DecodedClip(v) for v in videos])
    got = A.test_views(batch, 24, short_side, num_crops)
    want = torch.stack([torch.stack([view for clip in v for view in tf(clip)]) for v in videos])
    assert got.shape == (4, 2 * num_crops, 3, 3, 24, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=RESAMPLE_ATOL / 255 / D.STD)


def test_collated_batch_keeps_uint8_frames_and_parameters_as_tensors():
    tf = D.TrainTransform(16, randaugment="rand-m7-n4-mstd0.5-inc1")
    frames = _clips(5)
    params = [tf.sample(21, 26, np.random.default_rng(s)) for s in range(5)]
    batch = A.ClipBatch.collate([D.DecodedClip(f, p) for f, p in zip(frames, params)])
    assert len(batch) == 5 and batch.train and batch.groups[0].dtype == torch.uint8
    slots = max(len(p.ops) for p in params)  # the most ops a clip drew (each slot applies with probability 0.5)
    assert batch.op_index.shape == (5, slots) and batch.op_value.shape == (5, slots, 6)
    assert batch.op_value.dtype == torch.float32
    assert batch.box.tolist() == [list(p.box) for p in params] and batch.flip.tolist() == [p.flip for p in params]
    for i, p in enumerate(params):
        drawn = [D.RA_OP_NAMES[k] for k in batch.op_index[i].tolist() if k >= 0]
        assert drawn == [name for name, _, _ in p.ops]
    moved = batch.to("cpu")
    assert moved.groups[0].data_ptr() == batch.groups[0].data_ptr()  # nothing copied on the same device
    with pytest.raises(ValueError, match="training clips"):
        A.train_views(A.ClipBatch.collate([D.DecodedClip(frames[0])]), 16)


def test_augment_on_setting():
    cfg = {"data": {"dataset": "video_list", "augment_on": "auto"}}
    assert A.resolve_augment_on(cfg, torch.device("cpu")) == "cpu"
    assert A.resolve_augment_on(cfg, torch.device("cuda", 0)) == "gpu"
    cfg["data"]["augment_on"] = "gpu"
    assert A.resolve_augment_on(cfg, torch.device("cpu")) == "gpu"
    assert A.resolve_augment_on({"data": {"dataset": "synthetic", "augment_on": "gpu"}}, torch.device("cpu")) == "cpu"
    cfg["data"]["augment_on"] = "tpu"
    with pytest.raises(ValueError, match="data.augment_on='tpu'"):
        A.resolve_augment_on(cfg, torch.device("cpu"))
    from uniformerv2.recipes import build_config

    with pytest.raises(ValueError, match="data.augment_on"):
        build_config(None, None, ["data.augment_on=gpus"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned copies and the CUDA transform")
def test_on_cuda_the_batch_transform_equals_the_cpu_one():
    tf = D.TrainTransform(24, randaugment="rand-m7-n4-mstd0.5-inc1")
    frames = _clips(16, t=4, h=30, w=41, seed=3)
    params = [tf.sample(30, 41, np.random.default_rng(s)) for s in range(16)]
    batch = A.ClipBatch.collate([D.DecodedClip(f, p) for f, p in zip(frames, params)]).pin_memory()
    assert batch.groups[0].is_pinned()
    cfg = {"data": {"crop_size": 24, "short_side": None}, "eval": {"num_crops": 3}}
    got = A.to_device(batch, torch.device("cuda"), cfg, train=True)
    want = A.train_views(batch, 24)
    close = ((got.cpu() - want).abs() <= 0.05).float().mean().item()  # rounding may flip a posterize/solarize step
    assert got.is_cuda and close > 0.999, close
    views = [_clips(2, t=4, h=30, w=41, seed=s) for s in range(3)]
    test_batch = A.ClipBatch.collate([D.DecodedClip(v) for v in views]).pin_memory()
    torch.testing.assert_close(A.to_device(test_batch, torch.device("cuda"), cfg, train=False).cpu(),
                               A.test_views(test_batch, 24, None, 3), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------- real videos


def test_video_dataset_same_seed_same_parameters_both_ways(tmp_path):
    pytest.importorskip("av", reason="PyAV (av) is not installed: real videos cannot be written or read")
    from uniformerv2.synthetic import write_videos

    list_file, _ = write_videos(str(tmp_path), 6, num_frames=12, resolution=40, codec="mpeg4")
    kw = dict(num_frames=4, crop_size=24, short_side=28, num_clips=2, num_crops=3,
              randaugment="rand-m7-n4-mstd0.5-inc1", seed=5)
    cpu = D.VideoListDataset(list_file, train=True, **kw)
    raw = D.VideoListDataset(list_file, train=True, raw_frames=True, **kw)
    for epoch in (0, 1):
        cpu.set_epoch(epoch)
        raw.set_epoch(epoch)
        items = [raw[i] for i in range(len(raw))]
        for i, item in enumerate(items):
            clip = item["video"]
            assert isinstance(clip, D.DecodedClip) and clip.frames.dtype == torch.uint8
            # the CPU transform with the parameters the worker drew is the CPU data set's clip, exactly
            assert torch.equal(raw.train_transform.apply(clip.frames, clip.params), cpu[i]["video"])
        batch = A.collate_decoded_clips(items)
        assert isinstance(batch["video"], A.ClipBatch)
        got = A.train_views(batch["video"], 24)
        want = torch.stack([cpu[i]["video"] for i in range(len(cpu))])
        close = ((got - want).abs() <= RESAMPLE_ATOL / 255 / D.STD).float().mean().item()
        assert close > 0.999, close  # rounding may flip a posterize/solarize step of a pixel, rarely
    test_cpu = D.VideoListDataset(list_file, train=False, **kw)
    test_raw = D.VideoListDataset(list_file, train=False, raw_frames=True, **kw)
    batch = A.collate_decoded_clips([test_raw[i] for i in range(3)])
    torch.testing.assert_close(A.test_views(batch["video"], 24, 28, 3),
                               torch.stack([test_cpu[i]["video"] for i in range(3)]), rtol=0,
                               atol=RESAMPLE_ATOL / 255 / D.STD)


def test_training_and_evaluation_with_the_transform_on_the_batch(tmp_path, monkeypatch):
    """data.augment_on=gpu on a CPU: the workers decode, the step transforms; the same run as with the CPU
    transform (the same parameters drawn, values equal to rounding), and evaluation gives the same results."""
    pytest.importorskip("av", reason="PyAV (av) is not installed: real videos cannot be written or read")
    import json

    from uniformerv2 import evaluate, train
    from uniformerv2.synthetic import write_videos

    vids = tmp_path / "videos"
    train_list, labels = write_videos(str(vids), 8, num_frames=16, resolution=40, codec="mpeg4")
    val_list, _ = write_videos(str(vids), 4, num_frames=12, resolution=40, codec="libx264", split="val")
    common = ["--preset", "synthetic", "data.dataset=video_list", f"data.train_list={train_list}",
              f"data.val_list={val_list}", f"data.labels={labels}", "data.short_side=36",
              "data.randaugment=rand-m7-n4-mstd0.5-inc1", "model.overrides={width: 32, layers: 2, heads: 1, "
              "patch_size: 8, return_list: [0, 1]}", "data.num_frames=4", "data.crop_size=32",
              "train.progress=false", "train.log_every=1", "train.batch_size=4", "train.max_steps=2",
              "train.epochs=1", "eval.num_clips=2", "eval.num_crops=3", "eval.batch_size=2"]
    calls = {"train_views": 0, "test_views": 0}

    def counted(name):
        real = getattr(A, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(A, name, counted(name))
    runs = {}
    for where, workers in (("cpu", 0), ("gpu", 1)):
        out = tmp_path / where
        assert train.main([*common, "--output-dir", str(out), f"data.augment_on={where}",
                           f"data.num_workers={workers}"]) == 0
        with open(out / "metrics.jsonl") as fh:
            runs[where] = [json.loads(line) for line in fh]
    assert calls == {"train_views": 2, "test_views": 2}  # the gpu run: 2 steps, 2 validation batches
    losses = {w: [r["loss"] for r in rows if r["kind"] == "train"] for w, rows in runs.items()}
    assert len(losses["gpu"]) == 2
    assert losses["gpu"] == pytest.approx(losses["cpu"], rel=1e-4)
    val = {w: [r for r in rows if r["kind"] == "val"][0] for w, rows in runs.items()}
    assert val["gpu"]["acc1"] == val["cpu"]["acc1"] and val["gpu"]["loss"] == pytest.approx(val["cpu"]["loss"], rel=1e-4)
    results = {}
    for where in ("cpu", "gpu"):
        assert evaluate.main(["--checkpoint", str(tmp_path / "gpu" / "last.pt"), "--output-dir",
                              str(tmp_path / f"eval_{where}"), "--no-progress", f"data.augment_on={where}"]) == 0
        results[where] = json.loads((tmp_path / f"eval_{where}" / "results.json").read_text())
    assert calls["test_views"] == 4
    assert results["gpu"]["n"] == 4 and results["gpu"]["views"] == "2x3"
    assert results["gpu"]["confusion"] == results["cpu"]["confusion"]
    assert results["gpu"]["loss"] == pytest.approx(results["cpu"]["loss"], rel=1e-4)
