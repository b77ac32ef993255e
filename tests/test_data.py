"""Data pipeline: list files, PyAV decoding, official TSN sampling, transforms, unreadable videos,
and the synthetic motion data set."""

import logging
import os

import numpy as np
import pytest
import torch

# PyAV is a dependency of the package, but the lent GPU machine installs with --no-deps and has none
av = pytest.importorskip("av", reason="PyAV (av) is not installed: video decoding cannot be tested")

from uniformerv2.data import (MEAN, STD, FailureReporter, RandAugment, TrainTransform,
                              VideoListDataset, collate_videos, read_labels,
                              read_video_list, segment_indices, uniform_crop)
from uniformerv2.video import count_frames, decode_video
from uniformerv2.data import TestTransform as ViewTransform
from uniformerv2.synthetic import CLASSES, MovingShapes, render_clip


def _encode(path, frames, codec="mpeg4", fps=10, options=None):
    """``options``: the muxer's, e.g. ``{"movflags": "faststart"}`` for an mp4 with its index first."""
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _frame_id_video(path, n, h=40, w=56, codec="mpeg4"):
    """Frame i is a flat grey of level 8*i (+ noise-free), so decoded frames reveal their index."""
    frames = np.stack([np.full((h, w, 3), 8 * i + 4, dtype=np.uint8) for i in range(n)])
    _encode(path, frames, codec)
    return path


# ---------------------------------------------------------------------------------------- sampling


def _official_train(n, t, rnd):
    # the formula of the official kinetics_sparse loader (python `random.randint` is inclusive)
    seg = max(0.0, float(n - 1) / t)
    return [min(rnd(int(np.round(seg * i)), int(np.round(seg * (i + 1)))), n - 1) for i in range(t)]


@pytest.mark.parametrize("n,t", [(300, 8), (37, 16), (5, 8), (1, 4), (250, 32)])
def test_train_sampling_matches_official_segments(n, t):
    rng = np.random.default_rng(n * 31 + t)
    seg = max(0.0, (n - 1) / t)
    seen = set()
    for _ in range(50):
        idx = segment_indices(n, t, -1, 1, rng)
        assert len(idx) == t
        for i, j in enumerate(idx):
            lo, hi = int(np.round(seg * i)), min(int(np.round(seg * (i + 1))), n - 1)
            assert lo <= j <= hi, (i, j, lo, hi)
        seen.add(tuple(idx))
    # the same bounds as the official formula with a deterministic "random" pick of each end
    assert segment_indices(n, t, -1, 1, _FixedRng(0)) == _official_train(n, t, lambda a, b: a)
    assert segment_indices(n, t, -1, 1, _FixedRng(1)) == _official_train(n, t, lambda a, b: min(b, n - 1))
    if n > 2 * t:
        assert len(seen) > 1  # really random


class _FixedRng:
    def __init__(self, end):
        self.end = end

    def integers(self, lo, hi):  # hi exclusive
        return lo if self.end == 0 else hi - 1


def test_test_sampling_fixed_offsets():
    # official: start_i + int(seg / (K + 1) * (k + 1)), seg = (n - 1) / T
    n, t, k = 300, 8, 4
    seg = 299 / 8
    for clip in range(k):
        want = [min(int(np.round(seg * i)) + int(seg / (k + 1) * (clip + 1)), n - 1) for i in range(t)]
        assert segment_indices(n, t, clip, k) == want
    assert segment_indices(300, 8, 0, 1) == [18, 55, 93, 130, 168, 205, 242, 280]
    assert segment_indices(3, 8, 0, 1) == [0, 0, 0, 1, 1, 1, 2, 2]  # np.round: half to even
    with pytest.raises(ValueError, match="num_video_frames"):
        segment_indices(0, 8)
    with pytest.raises(ValueError, match="clip_index"):
        segment_indices(10, 8, 3, 2)


# ---------------------------------------------------------------------------------------- lists


def test_read_video_list_and_labels(tmp_path):
    (tmp_path / "a b.mp4").write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nvid/x.mp4 3\n\n/abs/y.mp4 0\na b.mp4 7\nz.mp4,2\n")
    items = read_video_list(str(lst))
    assert items == [(str(tmp_path / "vid/x.mp4"), 3), ("/abs/y.mp4", 0), (str(tmp_path / "a b.mp4"), 7),
                     (str(tmp_path / "z.mp4"), 2)]
    assert read_video_list(str(lst), root="/data")[0] == ("/data/vid/x.mp4", 3)
    bad = tmp_path / "bad.txt"
    bad.write_text("x.mp4 cat\n")
    with pytest.raises(ValueError, match="not an integer"):
        read_video_list(str(bad))
    names = tmp_path / "names.txt"
    names.write_text("abseiling\nair drumming\n")
    assert read_labels(str(names)) == ["abseiling", "air drumming"]
    names.write_text("1 b c\n0 a\n")
    assert read_labels(str(names)) == ["a", "b c"]


# ---------------------------------------------------------------------------------------- decoding


def test_decode_selected_frames_in_order(tmp_path):
    path = _frame_id_video(str(tmp_path / "ids.mp4"), 24)
    assert count_frames(path) == 24
    frames, rows = decode_video(path, lambda n: [5, 1, 5, 23])
    assert frames.shape == (3, 40, 56, 3) and frames.dtype == torch.uint8
    levels = frames[rows].float().mean(dim=(1, 2, 3))
    assert torch.allclose(levels, torch.tensor([44.0, 12.0, 44.0, 188.0]), atol=3)


def _short_gop_video(path, n, codec, gop, step=8, options=None):
    """Frame i: a flat grey of level step*i + 4 (reveals the index) plus a moving bar (gives inter-frame coding
    work), encoded with a keyframe every ``gop`` frames (B-frames as the codec's defaults have them, or as
    the encoder ``options`` say)."""
    frames = []
    for i in range(n):
        f = np.full((48, 64, 3), step * i + 4, dtype=np.uint8)
        f[:, (3 * i) % 56:(3 * i) % 56 + 8] = 255
        frames.append(f)
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.gop_size = gop
        s.options = options or {}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize("codec", ["h264", "mpeg4"])
def test_seeking_to_keyframes_gives_the_frames_of_sequential_decoding(tmp_path, codec, monkeypatch):
    """With several keyframes each wanted frame is decoded from the keyframe before it; the frames must be
    exactly those of decoding every frame in order (the fallback), for sparse and for clustered indices."""
    from uniformerv2 import video

    path = _short_gop_video(str(tmp_path / f"gop.{codec}.mp4"), 60, codec, gop=4, step=4)
    with av.open(path) as c:
        keyframes = sum(p.is_keyframe for p in c.demux(c.streams.video[0]) if p.size)
    assert keyframes >= 14
    results = []
    real_seek = video._decode_by_seeking
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: results.append(real_seek(*a)) or results[-1])
    sparse = [[3, 25, 50], [59, 10, 10, 40], [1, 33], [0, 20, 41, 59], [58, 59]]  # seeking skips frames: used
    dense = [[5, 6, 7, 8], list(range(0, 60, 4))]  # it would not pay: sequential
    seeked = [decode_video(path, lambda n, idx=idx: idx) for idx in sparse + dense]
    assert [r is not None for r in results] == [True] * len(sparse) + [False] * len(dense)
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: None)  # the sequential path only
    for idx, (frames, rows) in zip(sparse + dense, seeked):
        expected, expected_rows = decode_video(path, lambda n, idx=idx: idx)
        assert rows == expected_rows and torch.equal(frames, expected), idx
        levels = frames[rows].float().flatten(1).median(dim=1).values  # the grey, not the bar (1/8 of the width)
        assert torch.allclose(levels, torch.tensor([4.0 * i + 4 for i in idx]), atol=6), idx


def test_seeking_past_non_reference_frames_gives_the_frames_of_sequential_decoding(tmp_path, monkeypatch):
    """H.264 at GOP 16 with B-frames forced (three between references, in a pyramid): the seeking decoder
    skips the non-reference frames it does not want; every wanted frame must still be exactly the
    sequential decoder's, for the TSN draws of training clips and for adjacent frames."""
    from uniformerv2 import video

    path = _short_gop_video(str(tmp_path / "gop16.mp4"), 240, "h264", gop=16, step=1,
                            options={"x264-params": "bframes=3:b-adapt=0:b-pyramid=normal"})
    with av.open(path) as c:
        types = {int(f.pict_type) for f in c.decode(c.streams.video[0])}
    assert int(av.video.frame.PictureType.B) in types, types  # the case the skipping is for
    rng = np.random.default_rng(0)
    draws = [segment_indices(240, 8, -1, 1, rng) for _ in range(6)] + [[16, 17, 18, 19], [1, 2, 30, 31, 239]]
    results = []
    real_seek = video._decode_by_seeking
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: results.append(real_seek(*a)) or results[-1])
    seeked = [decode_video(path, lambda n, idx=idx: idx) for idx in draws]
    assert all(r is not None for r in results[:6])  # the training draws seek
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: None)
    for idx, (frames, rows) in zip(draws, seeked):
        expected, expected_rows = decode_video(path, lambda n, idx=idx: idx)
        assert rows == expected_rows and torch.equal(frames, expected), idx


@pytest.mark.parametrize("open_gop", [False, True])
def test_h264_in_mp4_seeks_from_the_container_index_where_keyframes_are_idr_pictures(tmp_path, open_gop,
                                                                                     monkeypatch):
    """H.264 in mp4 is read from the demuxer's sample table: only the runs from the IDR picture before a wanted
    frame are demuxed, and a frame's display index is the IDR's position plus its rank in the run. With open
    GOPs (keyframes that are not IDR pictures: frames after one may be shown before it) that does not hold: the
    whole stream is demuxed for the pts order instead. Either way the frames are those of sequential decoding,
    for draws within one run, across a run's end and at the last frame."""
    from uniformerv2 import video

    path = _short_gop_video(str(tmp_path / "gop.mp4"), 120, "h264", gop=16, step=2,
                            options={"x264-params": f"bframes=3:b-adapt=0:open-gop={int(open_gop)}"})
    with av.open(path) as c:
        stream = c.streams.video[0]
        idr = [video._is_idr(p, 4) for p in c.demux(stream) if p.size and p.is_keyframe]
    assert len(idr) >= 7 and idr[0] and all(idr) == (not open_gop), idr  # the case under test
    calls = []
    for name in ("_runs_from_container_index", "_packet_index", "_decode_by_seeking"):
        real = getattr(video, name)
        monkeypatch.setattr(video, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    draws = [[3, 40, 70, 100], [14, 15, 16, 17, 60, 119], [20, 36, 52, 68, 84]]
    seeked = []
    for idx in draws:
        calls.clear()
        seeked.append(decode_video(path, lambda n, idx=idx: idx))
        assert calls == (["_decode_by_seeking", "_runs_from_container_index"]
                         + ["_packet_index"] * open_gop), (idx, calls)
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: None)
    for idx, (frames, rows) in zip(draws, seeked):
        expected, expected_rows = decode_video(path, lambda n, idx=idx: idx)
        assert rows == expected_rows and torch.equal(frames, expected), idx


def test_a_video_without_a_frame_count_in_its_header(tmp_path):
    """webm (Something-Something's format) has no frame count: the clip is decoded once and only the wanted
    frames are converted to RGB."""
    try:
        av.codec.Codec("libvpx-vp9", "w")
    except Exception:  # noqa: BLE001
        pytest.skip("this PyAV build has no VP9 encoder")
    path = str(tmp_path / "clip.webm")
    frames = np.stack([np.full((48, 64, 3), 8 * i + 4, dtype=np.uint8) for i in range(12)])
    _encode(path, frames, codec="libvpx-vp9", fps=12)
    with av.open(path) as c:
        assert not c.streams.video[0].frames  # the case under test
    assert count_frames(path) == 12
    out, rows = decode_video(path, lambda n: [5, 1, 5, n - 1])
    assert out.shape == (3, 48, 64, 3)
    levels = out[rows].float().mean(dim=(1, 2, 3))
    assert torch.allclose(levels, torch.tensor([44.0, 12.0, 44.0, 92.0]), atol=4)


def test_a_single_keyframe_video_decodes_sequentially(tmp_path, monkeypatch):
    from uniformerv2 import video

    path = _short_gop_video(str(tmp_path / "one_gop.mp4"), 20, "h264", gop=100)
    results = []
    real_seek = video._decode_by_seeking
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: results.append(real_seek(*a)) or results[-1])
    frames, rows = decode_video(path, lambda n: [3, 19])
    assert results == [None]  # the seeking decoder declines: one keyframe
    levels = frames[rows].float().flatten(1).median(dim=1).values
    assert torch.allclose(levels, torch.tensor([28.0, 156.0]), atol=6)


def test_reencoding_keeps_every_frame_and_adds_keyframes(tmp_path, capsys, monkeypatch):
    from uniformerv2 import video
    from uniformerv2 import reencode

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    _short_gop_video(str(src / "a.mp4"), 30, "h264", gop=100)
    _short_gop_video(str(src / "sub" / "b.mp4"), 30, "mpeg4", gop=100)
    (src / "bad.mp4").write_bytes(b"not a video")
    (src / "train.txt").write_text("a.mp4 3\nbad.mp4 1\nsub/b.mp4 0\n")
    out = tmp_path / "fast"
    argv = [str(src / "train.txt"), str(out), "--gop", "4", "--short-side", "32", "--workers", "1", "--no-progress"]
    assert reencode.main(argv) == 0
    report = capsys.readouterr()
    assert "2 re-encoded, 0 already there, 1 unreadable" in report.out and "bad.mp4" in report.err
    assert (out / "train.txt").read_text() == "a.mp4 3\nsub/b.mp4 0\n"  # order and labels kept, bad left out
    seeks = []
    real_seek = video._decode_by_seeking
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: seeks.append(1) or real_seek(*a))
    for name in ("a.mp4", "sub/b.mp4"):
        with av.open(str(out / name)) as c:
            stream = c.streams.video[0]
            assert (stream.width, stream.height, stream.frames) == (42, 32, 30)  # 64x48 -> short side 32
            assert sum(p.is_keyframe for p in c.demux(stream) if p.size) >= 7
        frames, rows = decode_video(str(out / name), lambda n: [0, 13, 29])
        levels = frames[rows].float().flatten(1).median(dim=1).values
        assert torch.allclose(levels, torch.tensor([4.0, 108.0, 236.0]), atol=8), (name, levels)  # frame i kept
    assert len(seeks) == 2
    assert reencode.main(argv) == 0  # a second run keeps what is there
    assert "0 re-encoded, 2 already there, 1 unreadable" in capsys.readouterr().out
    parallel = argv[:1] + [str(tmp_path / "parallel")] + argv[2:-3] + ["--workers", "2", "--no-progress"]
    assert reencode.main(parallel) == 0  # through a process pool: the same list, the same frames
    assert (tmp_path / "parallel" / "train.txt").read_text() == (out / "train.txt").read_text()
    for name in ("a.mp4", "sub/b.mp4"):
        assert torch.equal(decode_video(str(tmp_path / "parallel" / name), lambda n: [0, 13, 29])[0],
                           decode_video(str(out / name), lambda n: [0, 13, 29])[0])
    with pytest.raises(SystemExit):
        reencode.main([str(src / "train.txt"), str(src)])  # would overwrite the originals
    (src / "clash.txt").write_text("a.mp4 0\na.avi 1\n")
    with pytest.raises(SystemExit):  # both would become a.mp4
        reencode.main([str(src / "clash.txt"), str(tmp_path / "clash"), "--no-progress"])
    assert "would both be written to" in capsys.readouterr().err


@pytest.mark.parametrize("fast_decode", [True, False])
def test_reencoding_for_fast_decoding_keeps_the_frames_exact(tmp_path, fast_decode, monkeypatch):
    """--fast-decode (the default) asks x264 for tune=fastdecode and no B-frame pyramid, --no-fast-decode for
    x264's defaults (the encoder's settings, which x264 writes into the stream, say which it got); either way the
    seeking decoder gives exactly the frames of sequential decoding."""
    from uniformerv2 import reencode, video

    src = _short_gop_video(str(tmp_path / "src.mp4"), 64, "h264", gop=100, step=3)
    dst = str(tmp_path / "out.mp4")
    assert reencode.reencode_video(src, dst, gop=16, fast_decode=fast_decode) == "written"
    settings = open(dst, "rb").read()
    for option, fast_value, default_value in (("cabac", 0, 1), ("deblock", 0, 1), ("b_pyramid", 0, 2),
                                              ("weightp", 0, 2), ("keyint", 16, 16)):
        assert f" {option}={fast_value if fast_decode else default_value}".encode() in settings, option
    with av.open(dst) as c:
        stream = c.streams.video[0]
        assert stream.frames == 64 and sum(p.is_keyframe for p in c.demux(stream) if p.size) == 4
    draws = [[3, 20, 37, 50], [15, 16, 17, 63], [8, 9]]
    seeks = []
    real_seek = video._decode_by_seeking
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: seeks.append(real_seek(*a)) or seeks[-1])
    seeked = [decode_video(dst, lambda n, idx=idx: idx) for idx in draws]
    assert seeks[0] is not None  # the sparse draw seeks
    monkeypatch.setattr(video, "_decode_by_seeking", lambda *a: None)
    for idx, (frames, rows) in zip(draws, seeked):
        expected, expected_rows = decode_video(dst, lambda n, idx=idx: idx)
        assert rows == expected_rows and torch.equal(frames, expected), idx
        levels = frames[rows].float().flatten(1).median(dim=1).values
        assert torch.allclose(levels, torch.tensor([3.0 * i + 4 for i in idx]), atol=6), idx
    parser = reencode.build_parser()
    assert parser.parse_args(["l.txt", "o"]).fast_decode is True
    assert parser.parse_args(["l.txt", "o", "--no-fast-decode"]).fast_decode is False


def test_a_training_clip_is_the_sampled_frames(tmp_path, monkeypatch):
    """decode_train_clip returns the decoded tensor itself when the draw has T distinct frames (no copy), and
    repeats rows where the draw repeats a frame (segments share their end frames; a short video)."""
    from uniformerv2 import data

    decoded = []
    real_decode = data.decode_video
    monkeypatch.setattr(data, "decode_video", lambda *a: decoded.append(real_decode(*a)) or decoded[-1])
    for n, seed, distinct in ((24, 0, True), (24, 5, False), (3, 0, False)):
        path = _frame_id_video(str(tmp_path / f"ids{n}.mp4"), n)
        idx = segment_indices(n, 8, -1, 1, np.random.default_rng(seed))
        assert (len(set(idx)) == 8) == distinct
        clip = data.decode_train_clip(path, 8, np.random.default_rng(seed))
        assert clip.shape == (8, 40, 56, 3) and clip.dtype == torch.uint8
        assert (clip.data_ptr() == decoded[-1][0].data_ptr()) == distinct
        levels = clip.float().mean(dim=(1, 2, 3))
        assert torch.allclose(levels, torch.tensor([8.0 * i + 4 for i in idx]), atol=3), (n, idx)


def test_unreadable_videos_are_reported_once_and_skipped(tmp_path, caplog):
    good = [_frame_id_video(str(tmp_path / f"g{i}.mp4"), 12) for i in range(3)]
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(3000))
    # a real mp4 cut in half: the header is fine, the stream is not
    whole = _frame_id_video(str(tmp_path / "whole.mp4"), 30)
    data = open(whole, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    lst = tmp_path / "list.txt"
    lst.write_text("g0.mp4 0\ngarbage.mp4 1\ng1.mp4 1\nmissing.mp4 2\ng2.mp4 2\ncut.mp4 0\n")
    train = VideoListDataset(str(lst), num_frames=4, train=True, crop_size=32)
    test = VideoListDataset(str(lst), num_frames=4, train=False, crop_size=32, num_clips=2, num_crops=3)
    reporter = FailureReporter()
    with caplog.at_level(logging.WARNING, logger="uniformerv2"):
        for _ in range(2):  # a second epoch must not report again
            batch = collate_videos([train[i] for i in range(len(train))])
            reporter(batch["failed"])
            assert batch["video"].shape == (6, 3, 4, 32, 32)  # every slot refilled with a good video
            tb = collate_videos([test[i] for i in range(len(test))])
            reporter(tb["failed"])
    bad_paths = {p for p, _ in batch["failed"]} | {p for p, _ in tb["failed"]}
    assert str(tmp_path / "garbage.mp4") in bad_paths and str(tmp_path / "missing.mp4") in bad_paths
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == len(bad_paths) == len(set(warned))
    # test mode drops the unreadable ones and keeps the order of the rest
    assert tb["video"].shape[1:] == (6, 3, 4, 32, 32)
    kept = set(tb["index"].tolist())
    assert {0, 2, 4} <= kept and not ({1, 3} & kept)


# ---------------------------------------------------------------------------------------- transforms


def test_train_transform_deterministic_per_rng_and_normalised():
    frames = torch.randint(0, 256, (8, 45, 61, 3), dtype=torch.uint8)
    tf = TrainTransform(32, randaugment="rand-m7-n4-mstd0.5-inc1")
    a = tf(frames, np.random.default_rng(3))
    b = tf(frames, np.random.default_rng(3))
    c = tf(frames, np.random.default_rng(4))
    assert a.shape == (3, 8, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    flat = TrainTransform(32, scale=(1.0, 1.0), ratio=(61 / 45, 61 / 45), flip=False)(
        torch.full((2, 45, 61, 3), 115, dtype=torch.uint8), np.random.default_rng(0))
    assert torch.allclose(flat, torch.full_like(flat, (115 / 255 - MEAN) / STD), atol=1e-5)


def test_flip_can_be_disabled():
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    tf = TrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    outs = {tf(frames, np.random.default_rng(s)).sum().item() for s in range(8)}
    assert len(outs) == 1
    tf.flip = True
    flipped = [torch.equal(tf(frames, np.random.default_rng(s)), tf(frames.flip(2), np.random.default_rng(s))
                           .flip(-1)) for s in range(8)]
    assert all(flipped)


def test_randaugment_spec_and_every_op():
    ra = RandAugment.from_spec("rand-m7-n4-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.std) == (7.0, 4, 0.5)
    with pytest.raises(ValueError, match="rand-"):
        RandAugment.from_spec("auto-m7")
    from uniformerv2.data import RA_OP_NAMES, ra_op

    x = torch.rand(3, 3, 20, 24) * 255
    for name in RA_OP_NAMES:
        for sign in (1.0, -1.0):
            y = ra_op(name, x.clone(), 0.7, sign)
            assert y.shape == x.shape and torch.isfinite(y).all(), name
            assert y.min() >= -1e-3 and y.max() <= 255 + 1e-3, name


# The plain out-of-place forms the transforms' in-place code must equal exactly (uniformerv2/data.py
# computes the same values with fewer full-size temporaries).

def _plain_equalize(x):
    out = torch.empty_like(x)
    xi = x.round().clamp(0, 255).long()
    for t in range(x.shape[0]):
        for c in range(x.shape[1]):
            hist = torch.bincount(xi[t, c].flatten(), minlength=256).float()
            nz = hist[hist > 0]
            step = (hist.sum() - nz[-1]) / 255
            if nz.numel() <= 1 or step == 0:
                out[t, c] = x[t, c]
            else:
                out[t, c] = ((torch.cumsum(hist, 0) - hist + step / 2) / step).floor().clamp(0, 255)[xi[t, c]]
    return out


def _plain_autocontrast(x):
    lo, hi = x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x).clamp(0, 255)


def _plain_affine(x, theta):
    fill = MEAN * 255.0
    t = torch.tensor(theta, dtype=x.dtype).view(1, 2, 3).expand(x.shape[0], 2, 3)
    grid = torch.nn.functional.affine_grid(t, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False) + fill


@pytest.mark.parametrize("layout", ["decoded", "contiguous"])
def test_transform_pieces_equal_their_plain_forms(layout):
    from uniformerv2 import data as D

    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 21, 26, 3), dtype=torch.uint8, generator=gen)
    clips = [D.to_float_frames(frames), torch.rand(2, 3, 19, 17, generator=gen) * 255,
             torch.full((2, 3, 6, 5), 9.0)]
    clips[2][1, 2] = 30.0  # constant planes: equalize and autocontrast leave them as they are
    if layout == "contiguous":  # to_float_frames gives channels-last strides; other callers may not
        clips = [c.contiguous() for c in clips]
    for x in clips:
        before = x.clone()
        torch.testing.assert_close(D._equalize(x), _plain_equalize(x), rtol=0, atol=0)
        torch.testing.assert_close(D._autocontrast(x), _plain_autocontrast(x), rtol=0, atol=0)
        for theta in ([[1, 0.2, 0], [0, 1, 0]], [[0.9, -0.4, 0.3], [0.4, 0.9, -0.1]]):
            torch.testing.assert_close(D._affine(x, theta), _plain_affine(x, theta), rtol=0, atol=0)
        for bits in range(9):
            plain = ((x.round().clamp(0, 255).long() >> (8 - bits)) << (8 - bits)).float()
            torch.testing.assert_close(D._posterize(x, bits), plain, rtol=0, atol=0)
        gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        torch.testing.assert_close(D._gray(x), gray, rtol=0, atol=0)
        for factor in (0.3, 1.6):
            torch.testing.assert_close(D._blend(x, gray, factor), (gray + (x - gray) * factor).clamp(0, 255),
                                       rtol=0, atol=0)
        for m in (0.2, 0.9):
            torch.testing.assert_close(D.ra_op("SolarizeIncreasing", x, m, 1.0),
                                       torch.where(x >= 256 - 256 * m, 255.0 - x, x), rtol=0, atol=0)
            torch.testing.assert_close(D.ra_op("SolarizeAdd", x, m, 1.0),
                                       torch.where(x < 128, (x + int(110 * m)).clamp(max=255), x), rtol=0, atol=0)
        kernel = (torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel,
                                             groups=3)
        torch.testing.assert_close(D._sharpness(x, 1.4), (blurred + (x - blurred) * 1.4).clamp(0, 255),
                                   rtol=0, atol=0)
        torch.testing.assert_close(D.normalize(x), ((x / 255.0 - MEAN) / STD).permute(1, 0, 2, 3), rtol=0, atol=0)
        assert torch.equal(x, before)  # no op writes into its input


def test_test_views_short_side_and_three_crops():
    # a wide video: crops at left / centre / right
    frames = torch.arange(60, dtype=torch.float32).view(1, 1, 1, 60).expand(2, 3, 30, 60)
    left, mid, right = (uniform_crop(frames, 30, p) for p in (0, 1, 2))
    assert left[..., 0].max() == 0 and right[..., -1].min() == 59 and mid[..., 0].min() == 15
    views = ViewTransform(32, short_side=40, num_crops=3)(torch.randint(0, 255, (4, 50, 100, 3), dtype=torch.uint8))
    assert len(views) == 3 and all(v.shape == (3, 4, 32, 32) for v in views)
    tall = ViewTransform(32, num_crops=1)(torch.randint(0, 255, (4, 90, 45, 3), dtype=torch.uint8))
    assert len(tall) == 1 and tall[0].shape == (3, 4, 32, 32)


def test_video_dataset_test_views_use_official_offsets(tmp_path):
    path = _frame_id_video(str(tmp_path / "ids.mp4"), 30, h=32, w=48)
    (tmp_path / "l.txt").write_text("ids.mp4 1\n")
    ds = VideoListDataset(str(tmp_path / "l.txt"), num_frames=4, train=False, crop_size=32, num_clips=2,
                          num_crops=3)
    item = ds[0]
    assert item["video"].shape == (6, 3, 4, 32, 32) and item["label"] == 1
    levels = (item["video"] * STD + MEAN) * 255  # back to pixel levels: 8 * frame + 4
    for clip in range(2):
        want = torch.tensor([8.0 * j + 4 for j in segment_indices(30, 4, clip, 2)])
        got = levels[clip * 3].mean(dim=(0, 2, 3))
        assert torch.allclose(got, want, atol=3), (clip, got, want)


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_a_pure_function_of_index_and_epoch():
    a, b = MovingShapes(16, split="train", seed=1), MovingShapes(16, split="train", seed=1)
    assert torch.equal(a[5]["video"], b[5]["video"])
    b.set_epoch(1)
    assert not torch.equal(a[5]["video"], b[5]["video"])  # fresh training clips every epoch
    v1, v2 = MovingShapes(8, split="val"), MovingShapes(8, split="val")
    v2.set_epoch(3)
    assert torch.equal(v1[2]["video"], v2[2]["video"])  # the validation set is fixed
    assert [a[i]["label"] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert a[0]["video"].shape == (3, 8, 32, 32) and len(CLASSES) == 4
    with pytest.raises(ValueError, match="split"):
        MovingShapes(4, split="dev")


def test_synthetic_motion_direction_is_in_the_frame_order():
    """The centroid of the shape moves along the class direction; reversed order = opposite class."""
    for label, (sx, sy) in {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}.items():
        rng = np.random.default_rng(label)
        clip = render_clip(rng, label, num_frames=8, resolution=32, noise=0.0).astype(np.float64)
        bg = clip[:, 0:1, 0:1, :]  # the shape is small; corners are mostly background
        diff = np.abs(clip - np.median(clip.reshape(8, -1, 3), axis=1)[:, None, None, :]).sum(-1)
        ys, xs = np.mgrid[0:32, 0:32]
        # circular mean of the shape position per frame (motion wraps around)
        ang_x = np.angle((diff * np.exp(2j * np.pi * xs / 32)).sum((1, 2)))
        ang_y = np.angle((diff * np.exp(2j * np.pi * ys / 32)).sum((1, 2)))
        step_x = np.angle(np.exp(1j * np.diff(ang_x))).mean() * 32 / (2 * np.pi)
        step_y = np.angle(np.exp(1j * np.diff(ang_y))).mean() * 32 / (2 * np.pi)
        assert bg.shape[0] == 8
        if sx:
            assert np.sign(step_x) == sx and abs(step_x) > 1.0 and abs(step_y) < 0.5
        else:
            assert np.sign(step_y) == sy and abs(step_y) > 1.0 and abs(step_x) < 0.5


class _Clips(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        video = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5) + i
        return {"video": video, "label": i % 2, "index": i, "failed": []}


def _collate_and_see_where(batch):
    out = collate_videos(batch)
    out["shared_where_stacked"] = out["video"].is_shared()  # before the batch is sent
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_a_workers_batch_is_stacked_into_shared_memory(workers):
    """In a DataLoader worker the batch is stacked straight into shared memory (sending it then copies nothing);
    in the main process it is an ordinary tensor. Either way it is the samples stacked."""
    dataset = _Clips()
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=workers,
                                         collate_fn=_collate_and_see_where)
    batches = list(loader)
    assert [len(b["video"]) for b in batches] == [3, 1]
    expected = torch.stack([dataset[i]["video"] for i in range(4)])
    assert torch.equal(torch.cat([b["video"] for b in batches]), expected)
    assert [b["shared_where_stacked"] for b in batches] == [workers > 0] * 2
    assert [b["label"].tolist() for b in batches] == [[0, 1, 0], [1]]
