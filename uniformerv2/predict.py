"""``uniformerv2-predict``: classify video files and print the top-5 classes.

Example::

    uniformerv2-predict video.mp4 --checkpoint runs/k400/best.pt --labels k400/labels.txt
    uniformerv2-predict a.mp4 b.mp4 --checkpoint best.pt --clips 4 --crops 3 --json

The frames are sampled and cropped like the test views of ``uniformerv2-eval`` (``--clips`` temporal
clips x ``--crops`` spatial crops, softmax averaged); the defaults come from the checkpoint's config.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .data import TestTransform, load_test_views, read_labels
from .runtime import INPUT_ERRORS, at_least_one, autocast_context, input_error_message, require_file
from .video import VideoDecodeError


def predict_video(model, path: str, num_frames: int, crop_size: int, short_side: int | None = None,
                  num_clips: int = 1, num_crops: int = 1, topk: int = 5, amp: str = "none",
                  device: torch.device | None = None) -> list[tuple[int, float]]:
    """Top-k (class index, probability) for one video file."""
    device = device or next(model.parameters()).device
    views = load_test_views(path, num_frames, num_clips, TestTransform(crop_size, short_side, num_crops))
    with torch.no_grad(), autocast_context(device, amp):
        logits = model(views.to(device))
    probs = logits.float().softmax(-1).mean(0)
    p, i = probs.topk(min(topk, probs.numel()))
    return [(int(c), float(v)) for c, v in zip(i, p)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniformerv2-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--labels", help="class names, one per line (default: the names stored in the checkpoint)")
    p.add_argument("--clips", type=at_least_one)
    p.add_argument("--crops", type=int, choices=(1, 3))
    p.add_argument("--topk", type=at_least_one, default=5)
    p.add_argument("--model", help="model name, for checkpoints not written by uniformerv2-train")
    p.add_argument("--config", help="YAML with data settings (for foreign checkpoints)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--fused", default="auto", help="auto | true | false")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per video (an unreadable one: its path and the error)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .evaluate import load_trained

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device}: expected auto, cpu, cuda or cuda:N")
    try:  # a missing file or a bad setting: a usage error, not a traceback
        if args.labels:
            names = read_labels(require_file(args.labels, "--labels"))
        model, cfg, stored_names = load_trained(args.checkpoint, [], args.config, args.model, device,
                                                args.fused if device.type == "cuda" else False)
    except INPUT_ERRORS as exc:
        parser.error(input_error_message(exc))
    if not args.labels:
        names = stored_names
    d, e = cfg["data"], cfg["eval"]
    status = 0
    for path in args.videos:
        try:
            top = predict_video(model, path, d["num_frames"], d["crop_size"], d["short_side"],
                                args.clips or e["num_clips"], args.crops or e["num_crops"], args.topk,
                                cfg["train"]["amp"] if device.type == "cuda" else "none", device)
        except VideoDecodeError as exc:
            print(f"{path}: cannot read video ({exc})", file=sys.stderr)
            if args.json:
                print(json.dumps({"video": path, "error": str(exc)}))
            status = 1
            continue
        rows = [{"rank": r + 1, "class": c, "name": names[c] if names and c < len(names) else str(c),
                 "probability": p} for r, (c, p) in enumerate(top)]
        if args.json:
            print(json.dumps({"video": path, "top": rows}))
        else:
            print(path)
            for row in rows:
                print(f"  {row['rank']}. {row['name']:<40s} {100 * row['probability']:6.2f}%  (class {row['class']})")
    return status


if __name__ == "__main__":
    sys.exit(main())
