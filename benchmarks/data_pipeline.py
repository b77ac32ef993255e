"""Throughput of the real-video input pipeline: is the data loader fast enough to feed the GPU?

A fused training step on an H100 consumes clips far faster than one CPU core decodes and augments them,
so real-video training is often bound by the DataLoader, not by the model. This measures each stage of what
``uniformerv2-train`` / ``uniformerv2-eval`` do with a video file (``uniformerv2/data.py``, ``video.py``,
``augment.py``):

- per clip, in one process: the CPU time (all threads: the cost per core) and the wall time of
  ``decode`` (PyAV decoding of the frames that sparse (TSN) sampling picks, for a training clip), of the CPU
  ``train transform`` (RandAugment when given, random resized crop, flip, normalisation), and of the test
  views of a video (decoding, and decoding + CPU transform);
- the batched transform of ``data.augment_on=gpu`` (``augment.train_views`` / ``test_views``) on a batch of
  ``--batch-size`` clips on ``--device`` (default: CUDA when there is one, else CPU tensors), per batch;
- the training Dataset through a ``torch.utils.data.DataLoader`` with ``--workers`` processes, both ways
  (``augment_on=cpu``: the workers transform; ``gpu``: they decode, the main process transforms on
  ``--device``), in clips per second; with ``--gpu-clips-per-s`` also against a step that consumes that many
  clips per second (emulated: the host queues it and moves on, as with a GPU), and how many workers that step
  would need at the measured rate per worker.

Videos: ``--list FILE`` (a ``path label`` list, as for training; ``--root``), or, by default, synthetic ones
written to a temporary folder (``--videos``, ``--frames``, ``--size``, ``--codec``, ``--fps``, ``--gop``),
shaped like Kinetics clips (10 s at 30 fps, short side 256) unless told otherwise. Their content (a smooth
panning field, a moving blob, a little noise) is simpler than real footage, so real files decode more
slowly: measure your own with ``--list``. ``--gop 16`` writes them as ``uniformerv2-reencode`` would.

    python benchmarks/data_pipeline.py --gop 16                        # synthetic Kinetics-like clips
    python benchmarks/data_pipeline.py --list k400/train.txt --workers 12 --gpu-clips-per-s 236
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness as H  # noqa: E402  (puts the repository on sys.path)
from uniformerv2 import augment as A  # noqa: E402
from uniformerv2 import data as D  # noqa: E402
from uniformerv2.reencode import x264_options  # noqa: E402


def _natural_frames(rng: np.random.Generator, frames: int, width: int, height: int):
    """Frames that code like footage rather than noise: a smooth colour field panning slowly, a moving bright
    blob, and a little sensor noise (pure noise would make every keyframe huge and slow)."""
    import torch.nn.functional as F

    low = torch.from_numpy(rng.uniform(0, 255, (1, 3, 9, 12)).astype(np.float32))
    field = F.interpolate(low, size=(2 * height, 2 * width), mode="bicubic", align_corners=False)[0].clamp(0, 255)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    colour = torch.tensor(rng.uniform(0, 1, 3), dtype=torch.float32)[:, None, None]
    for t in range(frames):
        dy, dx = int(height / 4 * (1 + np.sin(t / 40))), (t * width // 300) % width
        frame = field[:, dy:dy + height, dx:dx + width]
        cy, cx = height / 2 * (1 + 0.5 * np.sin(t / 15)), width / 2 * (1 + 0.6 * np.cos(t / 20))
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (height / 10) ** 2))
        frame = frame * (1 - blob) + 255 * blob * colour + torch.from_numpy(
            rng.normal(0, 2, (3, height, width)).astype(np.float32))
        yield frame.clamp(0, 255).byte().permute(1, 2, 0).numpy()


def write_synthetic_videos(out_dir: str, count: int, frames: int, width: int, height: int, codec: str,
                           fps: int, gop: int | None = None, fast_decode: bool = True) -> str:
    """``count`` synthetic videos (``_natural_frames``) and a list file; ``gop``: a keyframe every gop frames
    (default: the encoder's, 250 for H.264, which is what downloaded clips mostly have), for H.264 with the x264
    options of ``uniformerv2-reencode`` (``fast_decode``: its ``--fast-decode``)."""
    import av

    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        name = f"clip_{i:04d}.mp4"
        with av.open(os.path.join(out_dir, name), "w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if gop:
                stream.codec_context.gop_size = gop
                if stream.codec_context.name == "libx264":
                    stream.options = x264_options(gop, 23, fast_decode)
            for frame in _natural_frames(rng, frames, width, height):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        lines.append(f"{name} {i % 4}")
    list_file = os.path.join(out_dir, "list.txt")
    with open(list_file, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return list_file


def per_clip_ms(fn, items: list, reps: int) -> tuple[float, float]:
    """(CPU milliseconds, wall milliseconds) per item: the median over ``reps`` passes of each pass's mean.
    CPU time counts every thread of the process (FFmpeg's too): the cost per core of a worker."""
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        for item in items:
            fn(item)
        cpu.append((time.process_time() - c0) * 1e3 / len(items))
        wall.append((time.perf_counter() - w0) * 1e3 / len(items))
    return float(np.median(cpu)), float(np.median(wall))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall milliseconds of ``fn()`` (after one warm-up call), the device's queue included."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def loader_clips_per_s(dataset, batch_size: int, workers: int, batches: int, prepare=None,
                       step_clips_per_s: float | None = None, pin: bool = False) -> float:
    """Clips per second through a DataLoader (collated batches, ``prepare``d: the on-device transform), after
    its workers have started. With ``step_clips_per_s`` each batch also feeds an emulated training step that
    takes ``clips / step_clips_per_s`` seconds of device time: a step starts when both its batch and the device
    are ready, and the host goes on to the next batch meanwhile (the rate is then that of the whole run)."""
    # A short list is repeated to last the whole run: at the end of each pass over it the workers would wait
    # for the next pass to start (a list of one batch keeps one worker busy at a time), or restart.
    passes = -(-(batches + 1) * batch_size // len(dataset))
    listed = torch.utils.data.ConcatDataset([dataset] * passes) if passes > 1 else dataset
    loader = torch.utils.data.DataLoader(listed, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=A.collate_fn(dataset), drop_last=False, pin_memory=pin)
    prepare = prepare or (lambda video: video)
    it = iter(loader)
    prepare(next(it)["video"])  # worker start-up and the first batch are not throughput
    t0 = time.perf_counter()
    device_free = t0
    clips = 0
    for _ in range(batches):
        n = len(prepare(next(it)["video"]))
        clips += n
        if step_clips_per_s:
            device_free = max(device_free, time.perf_counter()) + n / step_clips_per_s
    end = max(time.perf_counter(), device_free)
    return clips / (end - t0)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--list", help="a `path label` list of videos (default: synthetic videos)")
    p.add_argument("--root", help="prefix of the listed paths (default: the list file's folder)")
    p.add_argument("--videos", type=int, default=8, help="synthetic videos to write")
    p.add_argument("--frames", type=int, default=300, help="frames per synthetic video")
    p.add_argument("--size", default="340x256", help="WIDTHxHEIGHT of the synthetic videos")
    p.add_argument("--codec", default="h264", help="codec of the synthetic videos")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--gop", type=int, default=None,
                   help="synthetic videos: a keyframe every GOP frames, as `uniformerv2-reencode --gop` writes them ("
                        "default: the encoder's)")
    p.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="synthetic H.264 videos with --gop: x264 options of `uniformerv2-reencode --fast-decode` "
                        "(the default) or of --no-fast-decode")
    p.add_argument("--num-frames", type=int, default=8, help="frames per clip (the model's T)")
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--randaugment", default="rand-m7-n4-mstd0.5-inc1",
                   help="RandAugment spec of the training transform; 'none' to switch it off")
    p.add_argument("--clips", type=int, default=4, help="test views: temporal clips")
    p.add_argument("--crops", type=int, default=3, help="test views: spatial crops (1 or 3)")
    p.add_argument("--reps", type=int, default=3, help="passes over the videos per stage (median)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=8, help="DataLoader batch")
    p.add_argument("--batches", type=int, default=8, help="DataLoader batches timed")
    p.add_argument("--gpu-clips-per-s", type=float, default=None,
                   help="clips/s a training step consumes (e.g. from benchmarks/results/e2e_*.md): the loader is "
                        "also run against a step of that rate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the batched transform (data.augment_on=gpu) runs")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.crops not in (1, 3):
        p.error(f"--crops must be 1 or 3, got {args.crops}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be a torch device such as cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    randaugment = None if args.randaugment.lower() == "none" else args.randaugment
    torch.set_num_threads(1)  # what each DataLoader worker does

    with tempfile.TemporaryDirectory(prefix="data_pipeline_") as tmp:
        if args.list:
            list_file, root, source = args.list, args.root, f"list {args.list}"
        else:
            try:
                width, height = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                p.error(f"--size must look like 340x256, got {args.size!r}")
            t0 = time.perf_counter()
            list_file = write_synthetic_videos(tmp, args.videos, args.frames, width, height, args.codec, args.fps,
                                               args.gop, args.fast_decode)
            root = None
            size = np.mean([os.path.getsize(path) for path, _ in D.read_video_list(list_file)]) / 1e3
            source = (f"{args.videos} synthetic {args.codec} videos, {args.frames} frames of {width}x{height} at "
                      f"{args.fps} fps, keyframe every {args.gop or 'default'} frames"
                      + (f" (`uniformerv2-reencode --{'' if args.fast_decode else 'no-'}fast-decode` x264 options)"
                         if args.gop else "")
                      + f", {size:.0f} kB per video (written in {time.perf_counter() - t0:.1f} s)")
        paths = [path for path, _ in D.read_video_list(list_file, root)]
        if not paths:
            p.error(f"{list_file} lists no videos")
        rows, lines = measure(args, list_file, root, randaugment)
    lines = [f"# Input pipeline throughput ({source})", ""] + lines
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return rows


def measure(args, list_file: str, root: str | None, randaugment: str | None) -> tuple[list[dict], list[str]]:
    """The per-clip rows, the batched transform, the DataLoader both ways: (rows, markdown lines)."""
    device = torch.device(args.device)
    paths = [path for path, _ in D.read_video_list(list_file, root)]
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    decoded = {path: D.decode_train_clip(path, args.num_frames, rng) for path in paths}
    train_tf = D.TrainTransform(args.crop_size, randaugment=randaugment)
    test_tf = D.TestTransform(args.crop_size, args.crop_size, args.crops)

    decode = per_clip_ms(lambda path: D.decode_train_clip(path, args.num_frames, rng), paths, args.reps)
    transform = per_clip_ms(lambda path: train_tf(decoded[path], rng), paths, args.reps)
    views_decode = per_clip_ms(lambda path: D.decode_test_clips(path, args.num_frames, args.clips), paths,
                               args.reps)
    views = per_clip_ms(lambda path: D.load_test_views(path, args.num_frames, args.clips, test_tf), paths, args.reps)
    rows = [
        {"stage": "decode (training clip)", "ms": decode[0], "wall_ms": decode[1]},
        {"stage": f"train transform ({'RandAugment + ' if randaugment else ''}crop, flip, normalise)",
         "ms": transform[0], "wall_ms": transform[1]},
        {"stage": "training clip: decode + transform", "ms": decode[0] + transform[0],
         "wall_ms": decode[1] + transform[1]},
        {"stage": f"test views of a video ({args.clips} clips x {args.crops} crops)", "ms": views[0],
         "wall_ms": views[1]},
        {"stage": f"test views of a video: decode only ({args.clips} clips)", "ms": views_decode[0],
         "wall_ms": views_decode[1]},
    ]
    for row in rows:
        row["rate"] = 1e3 / row["ms"]
    load_after = os.getloadavg()[0]

    # the batched transform of data.augment_on=gpu, on one batch of the decoded clips (repeated to fill it)
    clips = [D.DecodedClip(decoded[p], train_tf.sample(*decoded[p].shape[1:3], rng)) for p in paths]
    clips = (clips * args.batch_size)[:args.batch_size]
    train_batch = A.ClipBatch.collate(clips).to(device)
    test_batch = A.ClipBatch.collate([D.DecodedClip(D.decode_test_clips(p, args.num_frames, args.clips))
                                      for p in (paths * args.batch_size)[:args.batch_size]]).to(device)
    train_batch_ms = batch_ms(lambda: A.train_views(train_batch, args.crop_size), device, args.reps)
    test_batch_ms = batch_ms(lambda: A.test_views(test_batch, args.crop_size, args.crop_size, args.crops), device,
                             args.reps)

    datasets = {where: D.VideoListDataset(list_file, num_frames=args.num_frames, train=True,
                                          crop_size=args.crop_size, randaugment=randaugment, root=root,
                                          raw_frames=where == "gpu") for where in ("cpu", "gpu")}
    cfg = {"data": {"crop_size": args.crop_size, "short_side": args.crop_size}, "eval": {"num_crops": args.crops}}
    # On CUDA the gpu rows include the copy and the transform (queued on the device, as in training). On CPU
    # tensors the transform would take the host's cores from the workers, which no GPU machine does: the
    # loop then measures the decoding workers alone (the transform's time per batch is in its own table).
    on_device = (lambda video: A.to_device(video, device, cfg, train=True)) if device.type == "cuda" else None
    prepare = {"cpu": None, "gpu": on_device}
    pin = device.type == "cuda"
    loader = {where: loader_clips_per_s(datasets[where], args.batch_size, args.workers, args.batches,
                                        prepare[where], pin=pin) for where in datasets}
    fed = {}
    if args.gpu_clips_per_s:
        fed = {where: loader_clips_per_s(datasets[where], args.batch_size, args.workers, args.batches,
                                         prepare[where], args.gpu_clips_per_s, pin) for where in datasets}

    where_tf = "CUDA" if device.type == "cuda" else "CPU tensors, one thread"
    lines = [
        f"`benchmarks/data_pipeline.py`, {time.strftime('%Y-%m-%d', time.gmtime())}, commit {H.git_commit()}, "
        f"CPU {H._cpu_name()} ({os.cpu_count()} visible), torch {torch.__version__}; {args.num_frames} frames "
        f"per clip, crop {args.crop_size}; per clip in one process (median of {args.reps}); load average (1 min) "
        f"{load_before:.1f} before and {load_after:.1f} after the per-clip rows on {os.cpu_count()} cores" + (
            " (other processes shared the cores: the CPU times are the steadier figures)."
            if max(load_before, load_after) > os.cpu_count() else "."),
        "",
        "| stage | CPU ms per clip (all threads) | wall ms per clip | clips/s per core |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['stage']} | {r['ms']:.1f} | {r['wall_ms']:.1f} | {r['rate']:.1f} |" for r in rows]
    lines += [
        "",
        f"Batched transform (`data.augment_on=gpu`, uniformerv2/augment.py) on {where_tf}, batch {args.batch_size}:",
        "",
        "| stage | ms per batch | ms per clip |",
        "| --- | ---: | ---: |",
        f"| train transform ({'RandAugment + ' if randaugment else ''}crop, flip, normalise) | "
        f"{train_batch_ms:.1f} | {train_batch_ms / args.batch_size:.2f} |",
        f"| test views ({args.clips} clips x {args.crops} crops per video) | {test_batch_ms:.1f} | "
        f"{test_batch_ms / args.batch_size:.2f} |",
        "",
        f"DataLoader, {args.workers} workers, batch {args.batch_size} (training clips, collated; "
        + ("the `gpu` row copies each batch to the GPU and transforms it there):" if device.type == "cuda" else
           "the `gpu` row: the workers decode, the batched transform is not run in the loop):"),
        "",
        "| data.augment_on | clips/s | clips/s per worker |" + (
            f" against a {args.gpu_clips_per_s:g} clips/s step: clips/s (share) | workers it needs |"
            if fed else ""),
        "| --- | ---: | ---: |" + (" ---: | ---: |" if fed else ""),
    ]
    for where, rate in loader.items():
        per_worker = rate / max(args.workers, 1)
        line = f"| {where} | {rate:.1f} | {per_worker:.1f} |"
        if fed:
            need = math.ceil(args.gpu_clips_per_s / per_worker)
            line += f" {fed[where]:.1f} ({100 * fed[where] / args.gpu_clips_per_s:.0f}%) | about {need} |"
        lines.append(line)
    if fed:
        lines += ["", f"A training step consuming {args.gpu_clips_per_s:g} clips/s needs about the workers above "
                      "(data.num_workers), on as many free cores, at the per-worker rates measured here."]
    return rows, lines


if __name__ == "__main__":
    main()
