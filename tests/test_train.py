"""Trainer, evaluation and prediction end to end: real (PyAV-encoded) videos, exact resumption, a
2-process torchrun/gloo run, and a short version of the embedded main job."""

import functools
import glob
import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from uniformerv2 import evaluate, predict, runtime, train
from uniformerv2.loading import read_checkpoint_file
from uniformerv2.recipes import PRESETS, build_config, parse_override
from uniformerv2.synthetic import CLASSES, write_videos

# A very small model: every part on (stride-2 stem, LMHRA x2, DPE, global blocks), 32x32, 4 frames.
TINY = ["model.overrides={width: 32, layers: 2, heads: 1, patch_size: 8, return_list: [0, 1], no_lmhra: false}",
        "data.num_frames=4", "data.crop_size=32", "train.progress=false", "train.log_every=1"]


def _rows(out_dir, kind="train"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == kind]


# ---------------------------------------------------------------------------------------- config


def test_config_layers_and_errors(tmp_path):
    cfg = build_config("k400_b16_f8x224", None, ["optim.lr=2e-4", "model.overrides.width=96"])
    assert cfg["optim"]["lr"] == 2e-4 and cfg["optim"]["weight_decay"] == 0.05
    assert cfg["optim"]["clip_grad"] == 20.0 and cfg["train"]["amp"] == "fp16"
    assert cfg["eval"]["num_clips"] == 4 and cfg["eval"]["num_crops"] == 3
    assert cfg["model"]["overrides"] == {"width": 96}
    assert build_config("ssv2_b16_f16x224")["data"]["flip"] is False
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"preset": "synthetic", "optim": {"lr": 0.5}, "train": {"epochs": 1}}))
    cfg = build_config(None, str(f), ["train.epochs=3"])
    assert cfg["preset"] == "synthetic" and cfg["optim"]["lr"] == 0.5 and cfg["train"]["epochs"] == 3
    assert cfg["model"]["overrides"] == PRESETS["synthetic"]["model"]["overrides"]
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    with pytest.raises(KeyError, match="optim.learning_rate"):
        build_config(None, None, ["optim.learning_rate=1"])
    with pytest.raises(KeyError, match="unknown preset"):
        build_config("k999")
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("optim.lr")


@pytest.mark.parametrize("override, message", [
    ("optim.lr=1e-4x", "optim.lr='1e-4x': expected a number"),
    ("optim.lr=-1e-4", "optim.lr=-0.0001: expected a value >= 0"),
    ("optim.eps=0", "optim.eps=0: expected a value > 0"),
    ("train.epochs=-1", "train.epochs=-1: expected a value >= 1"),
    ("train.epochs=2.5", "train.epochs=2.5: expected an integer"),
    ("train.amp=fp8", "train.amp='fp8': expected one of none, fp16, bf16"),
    ("train.progress=1", "train.progress=1: expected true or false"),
    ("data.scale=0.5", "data.scale=0.5: expected a list"),
    ("data.synthetic.seed=x", "data.synthetic.seed='x': expected an integer"),
    ("train.label_smoothing=null", "train.label_smoothing=None: expected a number"),
    ("data.crop_size=48", "data.crop_size=48 but model.overrides.input_resolution=32"),  # the preset's model
    ("eval.num_crops=2", "eval.num_crops=2: expected one of 1, 3"),
])
def test_bad_setting_values_are_named_before_any_work(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_config("synthetic", None, [override])


def test_settings_that_take_more_than_their_defaults_type():
    assert build_config("synthetic", None, ["optim.clip_grad=0"])["optim"]["clip_grad"] == 0  # off, as null
    cfg = build_config("synthetic", None, ["optim.clip_grad=null", "model.fused=true", "train.compile=max-autotune",
                                           "optim.warmup_epochs=2", "train.max_steps=0", "model.overrides.width=96"])
    assert cfg["optim"]["clip_grad"] is None and cfg["optim"]["warmup_epochs"] == 2
    for name in PRESETS:  # every preset and every shipped YAML file passes the check
        build_config(name)
    for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml"))):
        build_config(None, path)


def test_command_lines_report_bad_input_as_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["optim.lr=abc"])
    assert exit_info.value.code == 2 and "config optim.lr='abc': expected a number" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pt")
    for main, argv in ((evaluate.main, ["--checkpoint", missing]),
                       (predict.main, ["video.mp4", "--checkpoint", missing])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and f"checkpoint {missing!r} not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    assert train.main(["--preset", "synthetic", *TINY, "--output-dir", str(out), "train.max_steps=0",
                       "data.synthetic.train_size=4", "data.synthetic.val_size=4", "train.batch_size=4",
                       "eval.batch_size=4"]) == 0
    return str(out / "last.pt")


def _input_error_cases(folder, checkpoint):
    """(command, argv, the start of the one-line message): each a mistake in what the user passed."""
    (folder / "videos").mkdir()
    (folder / "videos" / "list.txt").write_text("elsewhere/a.mp4 0\n")
    (folder / "videos" / "unreadable.txt").write_text("absent.mp4 0\n")
    (folder / "bad.yaml").write_text("model: {name: tiny\n  bad")
    (folder / "weights.txt").write_text("not a checkpoint")
    missing, video = str(folder / "missing.txt"), str(folder / "a.mp4")
    run = ["--preset", "synthetic", *TINY, "--output-dir", str(folder / "run")]
    return [
        (train.main, [*run, "data.dataset=video_list", f"data.train_list={missing}"],
         f"data.train_list={missing}: no such file, expected a file"),
        (train.main, [*run, f"data.labels={missing}"], f"data.labels={missing}: no such file"),
        (train.main, [*run, "--resume", missing], f"--resume={missing}: no such file"),
        (train.main, [*run, "data.dataset=video_list", f"data.train_list={folder / 'videos' / 'list.txt'}"],
         f"data.train_list={folder / 'videos' / 'list.txt'}: the folder {folder / 'videos' / 'elsewhere'} of its "
         "videos does not exist"),
        (train.main, [*run, "model.name=tiny_x"], "model.name='tiny_x': unknown model 'tiny_x'; known: "),
        (train.main, [*run, "data.dataset=video_list"], "data.train_list is empty: data.dataset=video_list trains"),
        (train.main, [*run, "--config", str(folder / "bad.yaml")],
         f'while parsing a flow mapping in "{folder / "bad.yaml"}", line 1'),
        (train.main, [*run, "--config", missing], f"--config={missing}: no such file"),
        (train.main, [*run, "model.clip=" + missing], f"model.clip={missing}: no such file"),
        (train.main, [*run, "--resume", str(folder / "weights.txt")],
         f"{folder / 'weights.txt'}: not a PyTorch checkpoint"),
        (predict.main, [video, "--checkpoint", checkpoint, "--labels", missing], f"--labels={missing}: no such file"),
        (predict.main, [video, "--checkpoint", str(folder / "weights.txt"), "--model", "tiny"],
         f"{folder / 'weights.txt'}: not a PyTorch checkpoint"),
        (predict.main, [video, "--checkpoint", checkpoint, "--topk", "0"],
         "argument --topk: expected an integer >= 1, got 0"),
        (predict.main, [video, "--checkpoint", checkpoint, "--topk", "-3"],
         "argument --topk: expected an integer >= 1, got -3"),
        (evaluate.main, ["--checkpoint", checkpoint, "--clips", "0"], "argument --clips: expected an integer >= 1"),
        (evaluate.main, ["--checkpoint", checkpoint, "--list", str(folder / "videos" / "unreadable.txt"),
                         "--output-dir", str(folder / "run"), "--no-progress"],
         f"data.val_list={folder / 'videos' / 'unreadable.txt'}: none of its 1 videos could be read"),
    ]


def test_every_input_error_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, small_checkpoint):
    for main, argv, message in _input_error_cases(tmp_path, small_checkpoint):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, (argv, err)
        assert err[-1].split(": error: ", 1)[1].startswith(message), (argv, err[-1])
        assert not (tmp_path / "run").exists(), argv


def test_compile_setting_maps_to_torch_compile_arguments():
    assert train.compile_options(False) is None and train.compile_options(None) is None
    assert train.compile_options(True) == {}
    assert train.compile_options("Max-Autotune") == {"mode": "max-autotune"}
    assert build_config("synthetic", None, ["train.compile=reduce-overhead"])["train"]["compile"] == "reduce-overhead"
    with pytest.raises(ValueError, match="train.compile='fast'"):
        train.compile_options("fast")


def test_schedule_param_groups_and_sampler():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = train.param_groups(model, 0.05)
    assert [len(g["params"]) for g in groups] == [1, 3] and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    opt = torch.optim.AdamW(groups, lr=1.0)
    s = train.WarmupCosine(opt, lr=1e-3, min_lr=1e-6, warmup_start_lr=1e-6, warmup_epochs=1, epochs=3,
                           iters_per_epoch=10)
    assert s.get_last_lr() == pytest.approx(1e-6)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lrs[10] == pytest.approx(1e-3) and lrs[20] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    shards = [runtime.ShardSampler(23, r, 3, shuffle=True, seed=1) for r in range(3)]
    idx = [list(sh) for sh in shards]
    assert all(len(i) == 7 for i in idx) and len(set(sum(idx, []))) == 21
    shards[0].set_epoch(0, skip=2)
    assert list(shards[0]) == idx[0][2:]
    shards[0].set_epoch(1)
    assert list(shards[0]) != idx[0]


# ---------------------------------------------------------------------------------------- real videos


def test_a_run_without_a_validation_set_says_so(tmp_path, caplog, recwarn):
    pytest.importorskip("av", reason="PyAV (av) is not installed: real videos cannot be written or read")
    train_list, _ = write_videos(str(tmp_path / "videos"), 4, num_frames=12, resolution=40, codec="mpeg4")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="uniformerv2"):
        assert train.main(["--preset", "synthetic", "--output-dir", str(out), *TINY, "data.dataset=video_list",
                           f"data.train_list={train_list}", "train.batch_size=4", "train.max_steps=1"]) == 0
    assert _rows(out, "val") == [] and (out / "curves.png").stat().st_size > 0
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert len(done) == 1 and done[0].endswith("; no validation"), done
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_real_videos_train_two_steps_evaluate_predict(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV (av) is not installed: real videos cannot be written or read")
    vids = tmp_path / "videos"
    train_list, labels = write_videos(str(vids), 8, num_frames=16, resolution=40, codec="mpeg4")
    val_list, _ = write_videos(str(vids), 4, num_frames=12, resolution=40, codec="libx264", split="val")
    (vids / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with open(train_list, "a") as fh:
        fh.write("broken.mp4 1\n")
    with open(val_list, "a") as fh:
        fh.write("does_not_exist.mp4 2\n")
    out = tmp_path / "run"
    rc = train.main(["--preset", "synthetic", "--output-dir", str(out), *TINY,
                     "data.dataset=video_list", f"data.train_list={train_list}", f"data.val_list={val_list}",
                     f"data.labels={labels}", "data.short_side=36", "data.randaugment=rand-m7-n4-mstd0.5-inc1",
                     "train.batch_size=4", "train.max_steps=2", "train.epochs=2", "eval.num_clips=2",
                     "eval.num_crops=3", "eval.batch_size=2"])
    assert rc == 0
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _rows(out))
    val = _rows(out, "val")
    assert len(val) == 1 and 0 <= val[0]["acc1"] <= 100
    for name in ("last.pt", "best.pt", "metrics.csv", "curves.png", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "last.pt", weights_only=False, map_location="cpu")
    assert {"model_state", "optimizer_state", "scaler", "scheduler", "epoch", "rng", "cfg"} <= set(ckpt)
    assert ckpt["global_step"] == 2 and ckpt["classes"] == list(CLASSES)
    assert "transformer.resblocks.0.lmhra1.pos_embed.0.running_mean" in ckpt["model_state"]

    eval_dir = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(out / "last.pt"), "--list", val_list, "--clips", "2", "--crops",
                          "3", "--output-dir", str(eval_dir), "--no-progress"]) == 0
    res = json.loads((eval_dir / "results.json").read_text())
    assert res["n"] == 4 and res["views"] == "2x3"
    assert res["skipped"] == [str(vids / "does_not_exist.mp4")]
    assert sum(map(sum, res["confusion"])) == 4 and len(res["per_class"]) == 4
    assert res["acc1"] == pytest.approx(val[0]["acc1"])  # same views, same model as the run's own eval
    assert (eval_dir / "confusion.png").stat().st_size > 0 and (eval_dir / "per_class.csv").exists()

    capsys.readouterr()
    video = str(vids / "val_00001.mp4")
    assert predict.main([video, "--checkpoint", str(out / "last.pt"), "--labels", labels, "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert [r["rank"] for r in top] == [1, 2, 3, 4]  # only 4 classes
    assert {r["name"] for r in top} == set(CLASSES)
    assert sum(r["probability"] for r in top) == pytest.approx(1.0, abs=1e-4)
    assert predict.main([video, "--checkpoint", str(out / "last.pt"), "--labels", labels]) == 0
    text = capsys.readouterr().out
    assert text.startswith(video) and "1. " in text and "%" in text


# ---------------------------------------------------------------------------------------- resume


def test_resume_continues_exactly(tmp_path):
    """N steps straight == k steps, stop, resume to N: same losses, same weights (dropout, drop path,
    BatchNorm and an epoch boundary included)."""
    common = ["--preset", "synthetic", *TINY, "data.synthetic.train_size=24", "data.synthetic.val_size=4",
              "train.batch_size=6", "train.epochs=2", "train.eval_every=0", "eval.batch_size=4",
              "model.overrides.mlp_dropout=[0.5, 0.5]", "model.overrides.cls_dropout=0.5",
              "model.overrides.backbone_drop_path_rate=0.2", "model.overrides.drop_path_rate=0.2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main([*common, "--output-dir", str(straight), "train.max_steps=6"])
    train.main([*common, "--output-dir", str(split), "train.max_steps=3"])
    first = [r["loss"] for r in _rows(split)]
    train.main([*common, "--output-dir", str(split), "train.max_steps=6", "--resume"])
    a, b = [r["loss"] for r in _rows(straight)], [r["loss"] for r in _rows(split)]
    assert len(a) == 6 and a == b and first == a[:3]
    assert len(set(a)) == 6
    sa = torch.load(straight / "last.pt", weights_only=False, map_location="cpu")
    sb = torch.load(split / "last.pt", weights_only=False, map_location="cpu")
    assert (sa["epoch"], sa["step_in_epoch"], sa["global_step"]) == (sb["epoch"], sb["step_in_epoch"], 6)
    for k, v in sa["model_state"].items():
        assert torch.equal(v, sb["model_state"][k]), k
    for k, v in sa["optimizer_state"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer_state"]["state"][k]["exp_avg_sq"])


class Killed(BaseException):
    """Stands for a kill -9: not an Exception, so nothing on the way out handles it."""


LIFECYCLE = ["--preset", "synthetic", *TINY, "model.overrides.no_lmhra=true", "data.synthetic.train_size=12",
             "data.synthetic.val_size=4", "train.batch_size=4", "train.epochs=2", "eval.batch_size=4",
             "optim.lr=0", "optim.warmup_start_lr=0", "optim.min_lr=0"]


def _kill_at(monkeypatch, where: str, call: int) -> None:
    """Raises Killed in the ``call``-th (1-based) validation, or half-way through writing the ``call``-th
    ``last.pt`` / ``best.pt``."""
    calls = []
    if where == "validation":
        real = train.evaluate_model

        def evaluate_model(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                raise Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(train, "evaluate_model", evaluate_model)
        return
    real_save = torch.save

    def save(obj, fh, *args, **kwargs):
        if os.path.basename(getattr(fh, "name", "")).startswith(where + ".tmp."):
            calls.append(1)
            if len(calls) == call:
                fh.write(b"half a checkpoint")
                raise Killed
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train.main([*LIFECYCLE, "--output-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("where, call", [("validation", 1), ("best.pt", 1), ("last.pt", 2)])
def test_an_interrupted_run_resumes_to_the_same_best_checkpoint(tmp_path, monkeypatch, uninterrupted_run, where,
                                                                call):
    """Killed during a validation or while writing a checkpoint, then resumed: best.pt, the validation rows and
    the best top-1 are those of the run that was never interrupted, and no temporary file is left. With lr 0
    every validation scores the same, so a later one must never replace the first best.pt."""
    straight, split = uninterrupted_run, tmp_path / "split"
    with monkeypatch.context() as patch:
        _kill_at(patch, where, call)
        with pytest.raises(Killed):
            train.main([*LIFECYCLE, "--output-dir", str(split)])
    assert bool(glob.glob(str(split / "*.tmp.*"))) == (where != "validation")  # what the kill left
    assert train.main([*LIFECYCLE, "--output-dir", str(split), "--resume"]) == 0
    assert not glob.glob(str(split / "*.tmp.*"))
    a, b = read_checkpoint_file(straight / "best.pt"), read_checkpoint_file(split / "best.pt")
    assert (b["epoch"], b["global_step"], b["best_acc1"]) == (a["epoch"], a["global_step"], a["best_acc1"]) == (
        1, 3, a["best_acc1"])
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k
    for k, v in a["optimizer_state"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer_state"]["state"][k]["exp_avg"]), k
    key = ("epoch", "step", "acc1", "loss")
    assert [[r[k] for k in key] for r in _rows(split, "val")] == [[r[k] for k in key] for r in _rows(straight, "val")]
    assert [r["step"] for r in _rows(split, "val")] == [3, 6]
    summary = json.loads((split / "summary.json").read_text())
    assert summary["best_acc1"] == a["best_acc1"]


def test_a_non_finite_loss_stops_training(tmp_path):
    """The check runs after the backward is queued (no host sync mid-step) but still before the optimizer
    step: lr 1e30 makes the second forward overflow."""
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train.main(["--preset", "synthetic", "--output-dir", str(tmp_path / "run"), *TINY, "train.batch_size=4",
                    "train.max_steps=4", "train.epochs=1", "train.eval_every=0", "optim.lr=1e30",
                    "optim.warmup_epochs=0", "optim.clip_grad=null"])


class FakeClock:
    """A clock that moves only when told to: time that the machine's load cannot stretch."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("fetch_s, step_s, share, warned", [(0.005, 0.08, 0.2, False), (0.04, 0.04, 0.8, True)])
def test_time_spent_waiting_for_data_is_logged_and_warned_about(tmp_path, monkeypatch, caplog, fetch_s, step_s,
                                                                 share, warned):
    """Each log window records the share of its time the loop waited for the next batch, and the clips per
    second, timed on a clock the test moves: fetching a clip takes ``fetch_s`` and a step ``step_s`` (4 clips a
    batch, 2 steps a window). 20% waiting passes quietly; 80% gets one warning naming data.num_workers."""
    from uniformerv2.run_log import DataWait
    from uniformerv2.synthetic import MovingShapes

    clock = FakeClock()
    monkeypatch.setattr(train, "DataWait", functools.partial(DataWait, clock=clock))
    fetch, step = MovingShapes.__getitem__, train.Trainer.train_step
    monkeypatch.setattr(MovingShapes, "__getitem__", lambda self, i: clock.advance(fetch_s) or fetch(self, i))
    monkeypatch.setattr(train.Trainer, "train_step", lambda self, batch: clock.advance(step_s) or step(self, batch))
    args = ["--preset", "synthetic", *TINY, "train.batch_size=4", "train.max_steps=6", "train.epochs=1",
            "train.eval_every=0", "train.log_every=2", "data.num_workers=0", "data.synthetic.train_size=24",
            "data.synthetic.val_size=4", "eval.batch_size=4", "--output-dir", str(tmp_path / "run")]
    with caplog.at_level("WARNING", logger="uniformerv2"):
        assert train.main(args) == 0
    rows = _rows(tmp_path / "run")
    assert [r["data_wait"] for r in rows] == pytest.approx([share] * 3)
    assert [r["clips_per_s"] for r in rows] == pytest.approx([8 / (2 * (4 * fetch_s + step_s))] * 3)
    warnings = [r.getMessage() for r in caplog.records if "waited" in r.getMessage()]
    assert len(warnings) == warned and all("data.num_workers (now 0)" in w for w in warnings), warnings


def test_the_log_summarises_the_run_and_keeps_clear_of_the_progress_bar(tmp_path, caplog, monkeypatch):
    """Without the bar: a start-up summary (data, device, model, batch, steps) and every log window's metrics
    in the log. With the bar: log records are written through tqdm (above the bar), not over it."""
    import logging

    from tqdm import std

    args = ["--preset", "synthetic", *TINY, "train.batch_size=4", "train.max_steps=2", "train.epochs=1",
            "data.synthetic.train_size=8", "data.synthetic.val_size=4", "eval.batch_size=4"]
    with caplog.at_level("INFO", logger="uniformerv2"):
        assert train.main([*args, "--output-dir", str(tmp_path / "plain")]) == 0
    log = [r.getMessage() for r in caplog.records]
    for start in ("data: 8 training videos, 4 validation videos, 4 classes (synthetic)",
                  "device: cpu, 1 process, amp none",
                  "batch 4 (4 per process), 2 steps per epoch, 1 epochs: 2 steps in all, from step 0"):
        assert any(m.startswith(start) for m in log), (start, log)
    assert any(m.startswith("model: tiny, ") and m.endswith("reference PyTorch ops") for m in log), log
    window = r"epoch 1 step \d: loss \d+\.\d{4} lr [\d.e+-]+ [\d.]+ clips/s, \d+% waiting for data"
    windows = [m for m in log if re.fullmatch(window, m)]
    assert len(windows) == 2, log

    written = []
    monkeypatch.setattr(std.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False:
                                                       written.append(s)))
    console = logging.StreamHandler(sys.stderr)  # what logging.basicConfig installs outside pytest
    logging.getLogger().addHandler(console)
    caplog.clear()
    try:
        with caplog.at_level("INFO", logger="uniformerv2"):
            assert train.main([*args, "train.progress=true", "--output-dir", str(tmp_path / "bar")]) == 0
    finally:
        logging.getLogger().removeHandler(console)
    assert any("data: 8 training videos" in s for s in written), written
    assert not any(re.match(r"epoch 1 step \d: loss", r.getMessage()) for r in caplog.records)


def test_the_log_names_the_backend_of_each_fused_op(tmp_path, caplog):
    """With model.fused=true the first step logs which backend each fused op selected (per call, on the
    step's own tensors): all five ops of the model, each on a backend that exists."""
    with caplog.at_level("INFO", logger="uniformerv2"):
        assert train.main(["--preset", "synthetic", *TINY, "--output-dir", str(tmp_path / "run"), "model.fused=true",
                           "train.batch_size=2", "train.max_steps=1", "data.synthetic.train_size=4",
                           "data.synthetic.val_size=2", "eval.batch_size=2"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fused ops: ")]
    assert len(lines) == 1, lines
    choices = dict(item.split(" on ") for item in lines[0][len("fused ops: "):].split(", "))
    assert sorted(choices) == ["clip_layer_norm", "fused_ffn", "global_query_attention", "local_temporal_mhra",
                               "spatial_attention"]
    assert set(choices.values()) <= {"cuda", "triton", "reference"}, choices


# ---------------------------------------------------------------------------------------- torchrun


# How long a torchrun job may take before a test calls it hung. A bound on a hang, not a speed check: the
# hang it catches lasts the 30-minute process-group timeout, while a loaded machine (other jobs on every core)
# takes minutes for what an idle one does in seconds.
TORCHRUN_LIMIT_S = 900


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_processes(args, out_dir):
    """uniformerv2.train in 2 CPU processes (gloo); returns the two ranks' rank reports."""
    # CPU processes even where a GPU is visible (two ranks cannot share one GPU: distributed.setup refuses)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "uniformerv2.train", *args,
         "--output-dir", str(out_dir)],
        env=env, capture_output=True, text=True, timeout=TORCHRUN_LIMIT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


DDP_ARGS = ["--preset", "synthetic", *TINY, "model.overrides.mlp_dropout=[0, 0]", "model.overrides.cls_dropout=0",
            "data.synthetic.train_size=32", "data.synthetic.val_size=6", "train.batch_size=8", "train.max_steps=3",
            "train.rank_report=true", "eval.batch_size=4"]


def test_torchrun_two_processes_gloo(tmp_path):
    """2 CPU processes (gloo, DDP): both ranks end with bitwise-identical weights, and the run matches a
    single process with the same global batch (no BatchNorm, no dropout: the maths is the same)."""
    args = [*DDP_ARGS, "model.overrides.no_lmhra=true"]
    out2 = tmp_path / "ddp"
    r0, r1 = _torchrun_two_processes(args, out2)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["param_digest"] == r1["param_digest"]
    assert len(r0["local_losses"]) == len(r1["local_losses"]) == 3
    assert r0["local_losses"] != r1["local_losses"]  # different shards of the batch
    mean = [(a + b) / 2 for a, b in zip(r0["local_losses"], r1["local_losses"])]
    assert r0["mean_losses"] == pytest.approx(mean, rel=1e-6)

    out1 = tmp_path / "single"
    train.main([*args, "--output-dir", str(out1)])
    single = json.loads((out1 / "rank0.json").read_text())
    assert single["world_size"] == 1
    assert single["local_losses"] == pytest.approx(r0["mean_losses"], rel=2e-4, abs=1e-5)
    # (weights are not compared: AdamW turns rounding-level gradient differences of near-zero gradients
    # into full-size steps; the losses of steps 2 and 3 already check the updated weights)


def test_torchrun_ranks_share_batchnorm_statistics(tmp_path):
    """With the local MHRA (BatchNorm3d), each rank updates its running statistics with its own shard;
    evaluation and checkpoints must use one set (rank 0's), or ranks evaluate different models."""
    r0, r1 = _torchrun_two_processes([*DDP_ARGS, "model.overrides.no_lmhra=false"], tmp_path / "ddp")
    assert r0["param_digest"] == r1["param_digest"]


# ---------------------------------------------------------------------------------------- main job


def test_main_job_short_version_learns_motion_direction(tmp_path):
    """The README's main job (`uniformerv2-train`, synthetic preset) shortened to 128 steps of 16 clips:
    the model must recognise the motion direction far above chance (25%). Seeded; all of seeds 0-2
    reached >= 98% when this was written, so 60% leaves a wide margin."""
    out = tmp_path / "main"
    rc = train.main(["--output-dir", str(out), "train.progress=false", "data.synthetic.train_size=1024",
                     "data.synthetic.val_size=256", "train.batch_size=16", "train.epochs=2", "optim.lr=3e-3",
                     "train.eval_every=0", "eval.batch_size=128"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 128
    assert summary["final"]["acc1"] > 60.0, summary
    assert (out / "curves.png").stat().st_size > 0
    losses = [r["loss"] for r in _rows(out)]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_k710_head_mapping_grad_checkpointing_and_bf16(tmp_path):
    import uniformerv2

    base = ["--preset", "synthetic", *TINY, "data.synthetic.train_size=8", "data.synthetic.val_size=2",
            "train.batch_size=4", "eval.batch_size=2"]
    src = uniformerv2.build_model("tiny", num_classes=710, width=32, layers=2, heads=1, patch_size=8,
                                  input_resolution=32, return_list=[0, 1], no_lmhra=False, num_frames=4,
                                  mlp_dropout=[0.0, 0.0], cls_dropout=0.0)
    torch.save({"model_state": src.state_dict()}, tmp_path / "k710.pth")
    (tmp_path / "idx.txt").write_text("5 700\n3 9\n")
    out = tmp_path / "mapped"
    train.main([*base, "--output-dir", str(out), f"model.pretrained={tmp_path / 'k710.pth'}",
                f"model.k710_head={tmp_path / 'idx.txt'}", "train.max_steps=0"])
    ck = torch.load(out / "last.pt", weights_only=False, map_location="cpu")
    assert ck["global_step"] == 0 and ck["model_build"]["num_classes"] == 4
    idx = torch.tensor([5, 700, 3, 9])
    assert torch.equal(ck["model_state"]["transformer.proj.2.weight"], src.transformer.proj[2].weight[idx])
    assert torch.equal(ck["model_state"]["transformer.proj.2.bias"], src.transformer.proj[2].bias[idx])
    # gradient checkpointing + bf16 autocast run (bf16 on CPU autocast; the fused kernels stay off)
    out2 = tmp_path / "ckpt_bf16"
    train.main([*base, "--output-dir", str(out2), "model.grad_checkpointing=true", "train.amp=bf16",
                "train.max_steps=1"])
    ck2 = torch.load(out2 / "last.pt", weights_only=False, map_location="cpu")
    assert ck2["model_build"]["use_checkpoint"] is True and ck2["global_step"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _rows(out2))


FAILING_RANK = '''
import os, sys
from uniformerv2 import synthetic, train

original = synthetic.MovingShapes.__getitem__

def failing(self, i):  # rank 1 cannot read its data from its 9th sample on
    failing.calls = getattr(failing, "calls", 0) + 1
    if os.environ.get("RANK") == "1" and failing.calls > 8:
        raise RuntimeError("simulated unreadable video on rank 1")
    return original(self, i)

synthetic.MovingShapes.__getitem__ = failing
train.main(sys.argv[1:])
'''


def test_torchrun_stops_when_one_rank_fails(tmp_path):
    """An error on one rank (out of memory, bad data) must end the job, not leave the failing rank in a
    barrier while the others wait in their next collective until the 30-minute process-group timeout."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    # CPU processes even where a GPU is visible (two ranks cannot share one GPU: distributed.setup refuses)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
             *[a for a in DDP_ARGS if a != "train.max_steps=3"], "train.max_steps=6",
             "model.overrides.no_lmhra=true", "--output-dir", str(tmp_path / "out")],
            env=env, capture_output=True, text=True, timeout=TORCHRUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job hung after one rank failed (still running after {TORCHRUN_LIMIT_S} s)")
    assert proc.returncode != 0
    assert "simulated unreadable video on rank 1" in proc.stdout + proc.stderr


def test_fused_auto_waits_for_gpu_verified_kernels(monkeypatch):
    """model.fused=auto uses the fused kernels on CUDA only once they have passed their tests on a GPU."""
    from uniformerv2_kernels import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "TRITON_GPU_VERIFIED", False)
    assert runtime.resolve_fused("auto") is False
    assert runtime.resolve_fused("true") is True and runtime.resolve_fused(False) is False
    monkeypatch.setattr(backends, "TRITON_GPU_VERIFIED", True)
    assert runtime.resolve_fused("auto") is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_fused("auto") is False
