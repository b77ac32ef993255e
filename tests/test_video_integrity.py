"""Damaged videos: a clip that cannot supply its frames is reported (path and reason) and skipped in training,
evaluation and prediction, never padded with copies of another frame; a genuinely short video keeps the
official sampling."""

import json
import logging
import os

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (av) is not installed: videos cannot be written or read")

from uniformerv2 import evaluate, predict, train  # noqa: E402
from uniformerv2.data import TestTransform as ViewTransform  # noqa: E402
from uniformerv2.data import load_test_views, segment_indices  # noqa: E402
from uniformerv2.synthetic import write_videos  # noqa: E402
from uniformerv2.video import VideoDecodeError, decode_video  # noqa: E402

from test_data import _encode as encode_video  # noqa: E402
from test_train import TINY  # noqa: E402


def _encode(path, frames, front_index=False):
    """H.264 mp4; ``front_index``: the index (moov) before the data, as `-movflags faststart` writes it."""
    encode_video(path, frames, codec="libx264", options={"movflags": "faststart"} if front_index else None)


def _frames(n, h=40, w=56):
    """Frame i a flat grey of level 2*i + 4 with noise on top (so that a cut drops many frames' data)."""
    rng = np.random.default_rng(0)
    levels = np.arange(n).reshape(n, 1, 1, 1) * 2 + 4
    return np.clip(levels + rng.integers(0, 40, (n, h, w, 3)), 0, 255).astype(np.uint8)


def damaged_videos(folder) -> dict[str, str]:
    """The damaged files a data set meets, each with the start of the reason it must be reported with."""
    os.makedirs(folder, exist_ok=True)
    reasons = {}
    for name, front_index, reason in (("cut.mp4", False, "cannot open"),
                                      ("cut_front_indexed.mp4", True, "truncated: its header promises 120 frames")):
        full = os.path.join(folder, "full_" + name)
        _encode(full, _frames(120), front_index)
        data = open(full, "rb").read()
        os.remove(full)
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data[: len(data) * 3 // 10])
        reasons[name] = reason
    open(os.path.join(folder, "empty.mp4"), "wb").close()
    reasons["empty.mp4"] = "cannot open"
    with open(os.path.join(folder, "not_a_video.mp4"), "w") as fh:
        fh.write("an mp4 name, a text file's content\n")
    reasons["not_a_video.mp4"] = "cannot open"
    return {os.path.join(folder, name): reason for name, reason in reasons.items()}


def test_a_front_indexed_truncated_video_is_an_error_not_padding(tmp_path):
    """Its header promises 120 frames; only the first ~40 decode. Sampled frames past the cut used to be
    copies of the last decoded frame."""
    path = next(p for p in damaged_videos(tmp_path) if p.endswith("cut_front_indexed.mp4"))
    with av.open(path) as c:
        assert c.streams.video[0].frames == 120  # the header is intact: the container opens
    with pytest.raises(VideoDecodeError, match=r"truncated: its header promises 120 frames, \d+ decode"):
        decode_video(path, lambda n: segment_indices(n, 8, 0, 1))


def test_a_genuinely_short_video_keeps_the_official_sampling(tmp_path):
    """3 frames for 8 sampled: every index is clamped to the video (frames repeat), exactly as the official
    sampling does; a complete short file is not 'truncated'."""
    path = tmp_path / "short.mp4"
    frames = np.stack([np.full((40, 56, 3), 60 * i + 20, dtype=np.uint8) for i in range(3)])
    _encode(path, frames)
    views = load_test_views(str(path), 8, 2, ViewTransform(32))
    for k in range(2):
        want = torch.tensor([60.0 * i + 20 for i in segment_indices(3, 8, k, 2)])
        got = (views[k].mean(dim=(0, 2, 3)) * 0.225 + 0.45) * 255
        assert torch.allclose(got, want, atol=3), (k, got, want)


def _log_reasons(caplog, paths):
    """For each path, the reason of the one 'skipping unreadable video' warning naming it."""
    found = {}
    for record in caplog.records:
        message = record.getMessage()
        for path in paths:
            if message.startswith(f"skipping unreadable video {path} ("):
                assert path not in found, f"{path} reported twice"
                found[path] = message[len(f"skipping unreadable video {path} ("):]
    return found


def test_damaged_videos_are_reported_and_skipped_in_training_evaluation_and_prediction(tmp_path, caplog, capsys):
    vids = tmp_path / "videos"
    train_list, labels = write_videos(str(vids), 8, num_frames=16, resolution=40, codec="mpeg4")
    val_list, _ = write_videos(str(vids), 4, num_frames=12, resolution=40, codec="mpeg4", split="val")
    bad = damaged_videos(vids)
    for list_file in (train_list, val_list):
        with open(list_file, "a") as fh:
            fh.writelines(f"{os.path.basename(p)} 1\n" for p in bad)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="uniformerv2"):
        # 12 listed, batch 4: the 3 steps of the first epoch visit every training video once
        assert train.main(["--preset", "synthetic", "--output-dir", str(out), *TINY, "data.dataset=video_list",
                           f"data.train_list={train_list}", f"data.val_list={val_list}", f"data.labels={labels}",
                           "train.batch_size=4", "train.max_steps=3", "train.epochs=1", "eval.batch_size=4"]) == 0
    reported = _log_reasons(caplog, bad)
    assert sorted(reported) == sorted(bad)
    for path, reason in bad.items():
        assert reported[path].startswith(reason), (path, reported[path])
    val = [json.loads(line) for line in open(out / "metrics.jsonl") if '"val"' in line]
    assert len(val) == 1 and val[0]["acc1"] >= 0  # the 4 readable videos

    assert evaluate.main(["--checkpoint", str(out / "last.pt"), "--list", val_list, "--output-dir",
                          str(tmp_path / "eval"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["n"] == 4 and res["skipped"] == sorted(bad)

    capsys.readouterr()
    good = str(vids / "val_00000.mp4")
    assert predict.main([good, *bad, "--checkpoint", str(out / "last.pt"), "--json"]) == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["video"] for r in records] == [good, *bad]
    assert "top" in records[0]
    for record, (path, reason) in zip(records[1:], bad.items()):
        assert record["error"].startswith(reason), record
        assert f"{path}: cannot read video ({reason}" in captured.err
