"""Throughput of the real-video input pipeline: is the data loader fast enough to feed the GPU?

A fused training step on an H100 consumes clips far faster than one CPU core decodes and augments them,
so real-video training is often bound by the DataLoader, not by the model. This measures, per clip and on
one core, each stage of what ``uniformerv2-train`` / ``uniformerv2-eval`` do with a video file
(``uniformerv2/data.py``):

- ``decode``: PyAV decoding of the frames that sparse (TSN) sampling picks, for a training clip;
- ``train transform``: RandAugment (when given), random resized crop, flip and normalisation of that clip;
- ``test views``: decoding and transforming every test view of a video (clips x crops);

then the whole training Dataset through a ``torch.utils.data.DataLoader`` with ``--workers`` processes, in
clips per second, and how many workers a training step that consumes ``--gpu-clips-per-s`` would need at
that rate per worker. The per-clip rows run in one process; FFmpeg may decode with several threads there
(``thread_type="AUTO"``, which measured faster than one thread per worker even with as many workers as
cores on the 2-core development machine).

Videos: ``--list FILE`` (a ``path label`` list, as for training; ``--root``), or, by default, synthetic ones
written to a temporary folder (``--videos``, ``--frames``, ``--size``, ``--codec``, ``--fps``, ``--gop``),
shaped like Kinetics clips (10 s at 30 fps, short side 256) unless told otherwise. Their content (a smooth
panning field, a moving blob, a little noise) is simpler than real footage, so real files decode more
slowly: measure your own with ``--list``. ``--gop 16`` writes them as ``uniformerv2-reencode`` would.

    python benchmarks/data_pipeline.py                                  # synthetic Kinetics-like clips
    python benchmarks/data_pipeline.py --list k400/train.txt --workers 8 --randaugment rand-m7-n4-mstd0.5-inc1 \\
        --gpu-clips-per-s 200
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
from uniformerv2 import data as D  # noqa: E402


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
                           fps: int, gop: int | None = None) -> str:
    """``count`` synthetic videos (``_natural_frames``) and a list file; ``gop``: a keyframe every gop frames
    (default: the encoder's, 250 for H.264, which is what downloaded clips mostly have)."""
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


def per_clip_ms(fn, items: list, reps: int) -> float:
    """Median over ``reps`` passes of the mean milliseconds per item."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - t0) * 1e3 / len(items))
    return float(np.median(times))


def loader_clips_per_s(dataset, batch_size: int, workers: int, batches: int) -> float:
    """Clips per second through a DataLoader (collated batches), after its workers have started."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=D.collate_videos, drop_last=False,
                                         persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not throughput
    t0 = time.perf_counter()
    clips = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        clips += batch["video"].shape[0]
    return clips / (time.perf_counter() - t0)


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
                   help="synthetic videos: a keyframe every GOP frames (as `uniformerv2-reencode --gop` writes; "
                        "default: the encoder's)")
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
                   help="clips/s a training step consumes (e.g. from benchmarks/results/e2e_*.md)")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.crops not in (1, 3):
        p.error(f"--crops must be 1 or 3, got {args.crops}")
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
                                               args.gop)
            root = None
            source = (f"{args.videos} synthetic {args.codec} videos, {args.frames} frames of {width}x{height} at "
                      f"{args.fps} fps, keyframe every {args.gop or 'default'} frames "
                      f"(written in {time.perf_counter() - t0:.1f} s)")
        paths = [path for path, _ in D.read_video_list(list_file, root)]
        if not paths:
            p.error(f"{list_file} lists no videos")
        rng = np.random.default_rng(0)
        sample = lambda n: D.segment_indices(n, args.num_frames, -1, 1, rng)  # noqa: E731
        decoded = {path: D.decode_video(path, sample) for path in paths}
        train_tf = D.TrainTransform(args.crop_size, randaugment=randaugment)
        test_tf = D.TestTransform(args.crop_size, args.crop_size, args.crops)

        decode_ms = per_clip_ms(lambda path: D.decode_video(path, sample), paths, args.reps)
        transform_ms = per_clip_ms(lambda path: train_tf(decoded[path][0][decoded[path][1]], rng), paths,
                                   args.reps)
        views_ms = per_clip_ms(lambda path: D.load_test_views(path, args.num_frames, args.clips, test_tf), paths,
                               args.reps)
        dataset = D.VideoListDataset(list_file, num_frames=args.num_frames, train=True, crop_size=args.crop_size,
                                     randaugment=randaugment, root=root)
        loader_rate = loader_clips_per_s(dataset, args.batch_size, args.workers, args.batches)

    per_process = 1e3 / (decode_ms + transform_ms)
    per_worker = loader_rate / max(args.workers, 1)
    rows = [
        {"stage": "decode (training clip)", "ms": decode_ms, "rate": 1e3 / decode_ms},
        {"stage": f"train transform ({'RandAugment + ' if randaugment else ''}crop, flip, normalise)",
         "ms": transform_ms, "rate": 1e3 / transform_ms},
        {"stage": "training clip: decode + transform", "ms": decode_ms + transform_ms, "rate": per_process},
        {"stage": f"test views of a video ({args.clips} clips x {args.crops} crops)", "ms": views_ms,
         "rate": 1e3 / views_ms},
    ]
    lines = [
        f"# Input pipeline throughput ({source})",
        "",
        f"`benchmarks/data_pipeline.py`, {time.strftime('%Y-%m-%d', time.gmtime())}, commit {H.git_commit()}, "
        f"CPU {H._cpu_name()} ({os.cpu_count()} visible), torch {torch.__version__}; {args.num_frames} frames "
        f"per clip, crop {args.crop_size}; per clip in one process (median of {args.reps}).",
        "",
        "| stage | ms per clip | clips/s per process |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {r['stage']} | {r['ms']:.1f} | {r['rate']:.1f} |" for r in rows]
    lines += ["", f"DataLoader, {args.workers} workers, batch {args.batch_size}: **{loader_rate:.1f} clips/s** "
                  f"(training clips, collated)."]
    if args.gpu_clips_per_s:
        need = math.ceil(args.gpu_clips_per_s / per_worker)
        lines.append(f"A training step consuming {args.gpu_clips_per_s:g} clips/s needs about {need} workers "
                     f"(data.num_workers) at the {per_worker:.1f} clips/s per worker measured here, on as many "
                     f"free cores.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
