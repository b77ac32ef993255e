"""Real-video training against input that costs nothing to produce: does the input pipeline keep the step fed?

Three runs of ``uniformerv2-train`` in one process, with the same preset, batch, precision and settings:

- ``videos``: on a video list with ``--workers`` DataLoader workers (``data.augment_on`` as configured:
  by default the workers decode and the batched transform runs on the training device);
- ``one batch``: the same, with the loader replaced by one that hands out the videos run's first batch
  again and again (already decoded and collated, in pinned memory like the loader's): the copy to the device
  and the transform on it are kept, only the workers' decoding is gone;
- ``device batch``: the same again, with that batch copied and transformed once and kept on the device: the
  step alone, the synthetic-input rate.

Each run's rate is its clips/s from ``metrics.jsonl`` over the log windows after the first (which holds the
workers' start-up and the first compiles); the table gives each rate as a share of the device-batch one. On the
GPU machine the goal is a videos share >= 90% with at most 12 workers.

Videos: ``--list`` (a ``path label`` list, as for training), or by default ``--videos`` synthetic ones written
as ``uniformerv2-reencode --gop 16`` would (``benchmarks/data_pipeline.py``). The list is repeated so that an
epoch outlasts the run: the trainer restarts its workers at each epoch.

    python benchmarks/real_video_training.py --preset k400_b16_f8x224 --batch 32 --workers 12 \\
        model.fused=true train.amp=bf16
    python benchmarks/real_video_training.py            # CPU: the tiny video-list model, a few steps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from uniformerv2 import train as T  # noqa: E402


class _OneBatchLoader:
    """Stands in for the DataLoader: ``length`` times the same collated batch."""

    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __len__(self):
        return self.length

    def __iter__(self):
        return (self.batch for _ in range(self.length))


@contextlib.contextmanager
def _one_batch(on_device: bool):
    """The trainer's ``make_loader`` returns a loader of its real first batch repeated (pinned where the real
    one pins); ``on_device``: its copy to the device and transform there (``to_device``) run once, and every
    step after the first gets that result (the loader hands out that one batch only)."""
    make_loader, to_device = T.make_loader, T.to_device
    on_device_batch = []

    def one_batch(dataset, batch_size, sampler, num_workers, seed, pin):
        loader = make_loader(dataset, batch_size, sampler, num_workers, seed, pin)
        return _OneBatchLoader(next(iter(loader)), len(loader))

    def once(video, *args, **kwargs):
        if not on_device_batch:
            on_device_batch.append(to_device(video, *args, **kwargs))
        return on_device_batch[0]

    T.make_loader = one_batch
    if on_device:
        T.to_device = once
    try:
        yield
    finally:
        T.make_loader, T.to_device = make_loader, to_device


def rate_after_first_window(output_dir: str) -> tuple[float, float, int]:
    """(clips/s, mean data-wait share, windows) over the train log windows after the first."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    windows = [r for r in rows if r["kind"] == "train"][1:]
    if not windows:
        raise SystemExit(f"{output_dir}: fewer than two log windows; raise --steps or lower train.log_every")
    clips_per_s = len(windows) / sum(1 / r["clips_per_s"] for r in windows)  # equal clips per window
    return clips_per_s, sum(r["data_wait"] for r in windows) / len(windows), len(windows)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--preset", default=None,
                   help="training preset (default: k400_b16_f8x224 on CUDA; on a CPU the tiny video-list model)")
    p.add_argument("--list", help="a `path label` list of videos (default: synthetic GOP-16 videos)")
    p.add_argument("--root", help="prefix of the listed paths (default: the list file's folder)")
    p.add_argument("--videos", type=int, default=8, help="synthetic videos to write")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (data.num_workers)")
    p.add_argument("--batch", type=int, default=None, help="clips per step (train.batch_size)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 60 on CUDA, 6 on a CPU)")
    p.add_argument("--log-every", type=int, default=None, help="steps per log window (default: steps / 6)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("overrides", nargs="*", help="section.key=value, for every run (as for uniformerv2-train)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers: at least 1 (the point is the workers' decoding)")
    cuda = torch.cuda.is_available()
    steps = args.steps or (60 if cuda else 6)
    log_every = args.log_every or max(1, steps // 6)
    if steps < 2 * log_every:
        p.error(f"--steps {steps}: at least two log windows of {log_every} steps are needed")
    if args.list and not os.path.isfile(args.list):
        p.error(f"--list: no such file: {args.list}")
    if cuda:
        preset, config, batch = args.preset or "k400_b16_f8x224", None, args.batch or 32
    elif args.preset:
        preset, config, batch = args.preset, None, args.batch or 16
    else:
        preset, config, batch = None, os.path.join(os.path.dirname(HERE), "configs", "video_list_tiny.yaml"), \
            args.batch or 4

    with tempfile.TemporaryDirectory(prefix="real_video_training_") as tmp:
        if args.list:
            list_file, root = args.list, args.root or os.path.dirname(os.path.abspath(args.list))
        else:
            from data_pipeline import write_synthetic_videos

            root = os.path.join(tmp, "videos")
            os.makedirs(root)
            list_file = write_synthetic_videos(root, args.videos, 300, 340, 256, "h264", 30, gop=16)
        with open(list_file) as fh:
            listed = [line for line in fh if line.strip()]
        repeated = os.path.join(tmp, "train.txt")
        with open(repeated, "w") as fh:
            fh.writelines(listed * -(-(steps + 2) * batch // len(listed)))
        common = [f"data.train_list={repeated}", f"data.root={root}", "data.dataset=video_list",
                  "data.val_list=null", f"data.num_workers={args.workers}", f"train.batch_size={batch}",
                  f"train.max_steps={steps}", f"train.log_every={log_every}", "train.epochs=1",
                  "train.progress=false", "train.checkpoint_every=0", *args.overrides]
        recipe = ["--config", config] if config else ["--preset", preset]
        rows = []
        for name, context in (("videos", contextlib.nullcontext()), ("one batch", _one_batch(on_device=False)),
                              ("device batch", _one_batch(on_device=True))):
            out_dir = os.path.join(tmp, name.replace(" ", "_"))
            with context:
                T.main([*recipe, "--output-dir", out_dir, *common])
            clips_per_s, wait, windows = rate_after_first_window(out_dir)
            rows.append(dict(run=name, clips_per_s=clips_per_s, data_wait=wait, windows=windows))

    device = torch.cuda.get_device_name() if cuda else "CPU"
    for r in rows:
        r["share"] = r["clips_per_s"] / rows[-1]["clips_per_s"]
    recipe_name = preset or "video_list_tiny.yaml"
    videos = args.list or f"{args.videos} synthetic, GOP 16"
    lines = [f"# Real-video training against one repeated batch and one batch on the device ({recipe_name}, "
             f"batch {batch}, {args.workers} workers, {steps} steps, windows of {log_every}; {device})", "",
             f"Overrides: {' '.join(args.overrides) or 'none'}; videos: {videos}.",
             "", "| run | clips/s | share of the device-batch rate | data wait (share of each window) | windows |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['run']} | {r['clips_per_s']:.1f} | {100 * r['share']:.0f}% | {100 * r['data_wait']:.0f}% | "
              f"{r['windows']} |" for r in rows]
    lines += ["", f"Real videos with {args.workers} workers: **{100 * rows[0]['share']:.0f}%** of the device-batch "
              f"rate ({100 * rows[0]['clips_per_s'] / rows[1]['clips_per_s']:.0f}% of the one-batch rate)."]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
