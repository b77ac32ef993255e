"""Re-encode the videos of a list for fast sparse sampling.

Training reads 8-16 frames spread over each clip. FFmpeg can only start decoding at a keyframe, and encoders
put one every 250 frames by default, so most clips are decoded whole for 8 frames. Re-encoded with a keyframe
every ``--gop`` frames (H.264), ``uniformerv2.video.decode_video`` starts at the keyframe before each sampled
frame instead: 2-3x faster decoding of 8 of 300 frames at GOPs of 8-32 on the development machine
(``benchmarks/data_pipeline.py``; the files grow by 1.3-2x). ``--short-side`` also scales the videos down,
as mmaction2's Kinetics preparation does (e.g. 320 for 224 crops); decoding time scales with the pixels.
``--fast-decode`` (the default) trades file size for decoding time: x264's ``tune=fastdecode`` and no B-frame
pyramid (``x264_options``); ``--no-fast-decode`` keeps x264's defaults.

    uniformerv2-reencode k400/train.txt k400_fast/ --gop 16 --short-side 320 --workers 8
    uniformerv2-train ... data.train_list=k400_fast/train.txt

Writes each listed video to ``OUT_DIR/<its path relative to the list's root>`` with an ``.mp4`` suffix, and
``OUT_DIR/<list file name>`` with the same labels and order. A video that cannot be read is reported and left
out of the new list; outputs that already exist are kept (an interrupted run resumes), unless ``--overwrite``.
Frame rate and frame count are kept, so sampling picks the same frame indices as on the originals.
"""

from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction

from .data import read_video_list
from .video import VideoDecodeError, open_video_stream


def output_path(path: str, root: str, out_dir: str) -> str:
    """Where ``path`` (a listed video) goes: its path relative to the list's root, under out_dir, as .mp4."""
    rel = os.path.relpath(path, root)
    if rel.startswith(os.pardir):  # listed outside the root (an absolute path elsewhere): keep the name only
        rel = os.path.basename(path)
    return os.path.join(out_dir, os.path.splitext(rel)[0] + ".mp4")


def _even(v: float) -> int:
    return max(2, int(round(v / 2)) * 2)  # yuv420p needs even sizes


def x264_options(gop: int, crf: int, fast_decode: bool) -> dict:
    """libx264's options: a keyframe exactly every ``gop`` frames (no extra ones at scene cuts); ``fast_decode``:
    ``tune=fastdecode`` (CAVLC instead of CABAC, no deblocking filter, no weighted prediction: each frame
    decodes in less time) and no B-frame pyramid (no B-frame is a reference, so the seeking decoder skips
    every B-frame it does not return), for larger files of somewhat lower quality at the same crf
    (benchmarks/results/data_pipeline_cpu.md)."""
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
    options = {"crf": str(crf), "preset": "medium"}
    if fast_decode:
        params += ":b-pyramid=none"
        options["tune"] = "fastdecode"
    return {**options, "x264-params": params}


def reencode_video(src: str, dst: str, gop: int = 16, short_side: int | None = None, crf: int = 23,
                   overwrite: bool = False, fast_decode: bool = True) -> str:
    """Re-encode one video as H.264 with a keyframe every ``gop`` frames (``x264_options``). Returns "written"
    or "kept"; raises VideoDecodeError when the source cannot be read."""
    import av

    if os.path.exists(dst) and not overwrite:
        return "kept"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".part.mp4"
    source, stream_in = open_video_stream(src)  # VideoDecodeError when unreadable
    written = 0
    try:
        rate = stream_in.average_rate or stream_in.guessed_rate or Fraction(30)
        with av.open(tmp, "w") as out:
            stream_out = None
            for frame in source.decode(stream_in):
                if stream_out is None:  # sized from the first frame
                    w, h = frame.width, frame.height
                    if short_side:
                        scale = short_side / min(w, h)
                        w, h = w * scale, h * scale
                    w, h = _even(w), _even(h)
                    stream_out = out.add_stream("libx264", rate=rate)
                    stream_out.width, stream_out.height, stream_out.pix_fmt = w, h, "yuv420p"
                    stream_out.codec_context.gop_size = gop
                    stream_out.options = x264_options(gop, crf, fast_decode)
                frame = frame.reformat(width=stream_out.width, height=stream_out.height, format="yuv420p")
                # x264 would code a frame as the source's decoder typed it (I, P or B: its keyframes too)
                frame.pict_type = av.video.frame.PictureType.NONE
                frame.pts, frame.time_base = written, Fraction(1) / rate  # frame i at i / rate: the same frames
                for packet in stream_out.encode(frame):
                    out.mux(packet)
                written += 1
            if stream_out is None:
                raise VideoDecodeError("no frames decoded")
            for packet in stream_out.encode():
                out.mux(packet)
    except VideoDecodeError:
        _remove(tmp)
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt stream, bad packet, ...
        _remove(tmp)
        raise VideoDecodeError(f"re-encoding failed after {written} frames: {type(exc).__name__}: {exc}") from exc
    finally:
        source.close()
    os.replace(tmp, dst)
    return "written"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _job(args) -> tuple[int, str, str | None]:
    i, src, dst, gop, short_side, crf, overwrite, fast_decode = args
    try:
        return i, reencode_video(src, dst, gop, short_side, crf, overwrite, fast_decode), None
    except VideoDecodeError as exc:
        return i, "failed", str(exc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniformerv2-reencode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("list", help="a `path label` list of videos, as for training")
    p.add_argument("out_dir", help="folder for the re-encoded videos and the new list")
    p.add_argument("--root", help="prefix of the listed paths (default: the list file's folder)")
    p.add_argument("--gop", type=int, default=16, help="frames from one keyframe to the next")
    p.add_argument("--short-side", type=int, default=None, help="scale the short side to this (default: keep)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality (lower: better, larger)")
    p.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="x264 tune=fastdecode and no B-frame pyramid: about 40%% less decoding CPU per training "
                        "clip, files about a third larger at the same --crf (--no-fast-decode: x264's defaults)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="re-encode videos that already have an output")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gop < 1:
        parser.error(f"--gop must be at least 1, got {args.gop}")
    if args.short_side is not None and args.short_side < 2:
        parser.error(f"--short-side must be at least 2, got {args.short_side}")
    if not 0 <= args.crf <= 51:
        parser.error(f"--crf must be in 0..51, got {args.crf}")
    if not os.path.isfile(args.list):
        parser.error(f"list file {args.list!r} not found")
    try:
        items = read_video_list(args.list, args.root)
    except ValueError as exc:
        parser.error(str(exc))
    root = args.root or os.path.dirname(os.path.abspath(args.list))
    out_dir = os.path.abspath(args.out_dir)
    if os.path.abspath(root) == out_dir:
        parser.error("out_dir is the list's root: the re-encoded videos would replace the originals")
    jobs = [(i, src, output_path(src, root, out_dir), args.gop, args.short_side, args.crf, args.overwrite,
             args.fast_decode) for i, (src, _) in enumerate(items)]
    sources_of: dict[str, str] = {}
    for _, src, dst, *_ in jobs:  # e.g. a.avi and a.mp4 (or two absolute paths outside the root named alike)
        if dst in sources_of and sources_of[dst] != src:
            parser.error(f"{sources_of[dst]} and {src} would both be written to {dst}")
        sources_of[dst] = src
    from tqdm import tqdm

    results: dict[int, tuple[str, str | None]] = {}
    bar = tqdm(total=len(jobs), desc="re-encoding", unit="video", disable=args.no_progress, file=sys.stderr)
    if args.workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for i, status, error in pool.imap_unordered(_job, jobs):
                results[i] = (status, error)
                bar.update(1)
    else:
        for job in jobs:
            i, status, error = _job(job)
            results[i] = (status, error)
            bar.update(1)
    bar.close()
    lines, failed = [], []
    for (i, src, dst, *_), (_, label) in zip(jobs, items):
        status, error = results[i]
        if status == "failed":
            failed.append(f"{src}: {error}")
        else:
            lines.append(f"{os.path.relpath(dst, out_dir)} {label}")
    os.makedirs(out_dir, exist_ok=True)
    list_out = os.path.join(out_dir, os.path.basename(args.list))
    with open(list_out, "w") as fh:
        fh.write("\n".join(lines) + ("\n" if lines else ""))
    counts = {s: sum(1 for st, _ in results.values() if st == s) for s in ("written", "kept", "failed")}
    print(f"{counts['written']} re-encoded, {counts['kept']} already there, {counts['failed']} unreadable; "
          f"list: {list_out}")
    for line in failed:
        print(f"  unreadable: {line}", file=sys.stderr)
    return 1 if failed and not lines else 0


if __name__ == "__main__":
    sys.exit(main())
