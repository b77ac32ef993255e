"""CPU time of decoding training clips: decoders and encodings compared on the same files, interleaved.

Each ARM is ``NAME=LIST`` (a ``path label`` video list) and optionally ``@COMMIT``: the decoder of that git
commit (its ``uniformerv2/video.py``) instead of this checkout's. Every pass decodes one training clip of
each video (8 frames by ``--num-frames``, a TSN draw, the same draws for every arm) with each arm in turn,
alternating the order of the arms from pass to pass, so that load from other processes falls on all arms
alike. Reported per arm: the process CPU time per clip (all threads: the cost per core), median and minimum
over the passes, its user / system split, minor page faults, and the mean file size.

    python benchmarks/decode_cost.py --passes 12 before=gop16/list.txt@cf6773c after=gop16/list.txt \\
        fast=gop16_fast/list.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from uniformerv2 import data as D  # noqa: E402
from uniformerv2 import video as V  # noqa: E402


def decoder_at(commit: str, folder: str):
    """``decode_video`` of ``uniformerv2/video.py`` as of ``commit``, imported from a copy in ``folder``."""
    try:
        source = subprocess.run(["git", "-C", REPO, "show", f"{commit}:uniformerv2/video.py"], check=True,
                                capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"@{commit}: git cannot show uniformerv2/video.py there: {exc.stderr.strip()}") from exc
    path = os.path.join(folder, f"video_{commit}.py")
    with open(path, "w") as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location(f"video_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.decode_video


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("arms", nargs="+", metavar="NAME=LIST[@COMMIT]")
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--num-frames", type=int, default=8)
    args = p.parse_args(argv)
    if args.passes < 1:
        p.error(f"--passes must be at least 1, got {args.passes}")
    torch.set_num_threads(1)  # what each DataLoader worker does
    with tempfile.TemporaryDirectory(prefix="decode_cost_") as tmp:
        arms = []
        for spec in args.arms:
            name, sep, rest = spec.partition("=")
            if not sep or not name or not rest:
                p.error(f"an arm is NAME=LIST[@COMMIT], got {spec!r}")
            list_file, _, commit = rest.partition("@")
            if not os.path.isfile(list_file):
                p.error(f"{name}: list file {list_file!r} not found")
            paths = [path for path, _ in D.read_video_list(list_file)]
            arms.append((name, paths, decoder_at(commit, tmp) if commit else V.decode_video))

        def one_pass(paths, decode, seed):
            rng = np.random.default_rng(seed)
            for path in paths:
                decode(path, lambda n: D.segment_indices(n, args.num_frames, -1, 1, rng))

        for _, paths, decode in arms:  # warm-up: imports, first allocations
            one_pass(paths, decode, args.passes)
        cpu = {name: [] for name, *_ in arms}
        usage = {name: np.zeros(3) for name, *_ in arms}
        load = [os.getloadavg()[0]]
        for k in range(args.passes):
            for name, paths, decode in (arms if k % 2 == 0 else arms[::-1]):
                r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
                one_pass(paths, decode, k)
                c1, r1 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
                cpu[name].append((c1 - c0) * 1e3 / len(paths))
                usage[name] += np.array([r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime,
                                         r1.ru_minflt - r0.ru_minflt]) / len(paths)
        load.append(os.getloadavg()[0])
    print(f"{args.passes} passes, one {args.num_frames}-frame training clip per video and arm per pass, load average "
          f"{load[0]:.1f} before, {load[1]:.1f} after, {os.cpu_count()} cores")
    print("")
    print("| arm | videos | kB per video | CPU ms per clip, median | min | user ms | system ms | minor faults |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, paths, _ in arms:
        user, system, faults = usage[name] / args.passes
        size = np.mean([os.path.getsize(path) for path in paths]) / 1e3
        print(f"| {name} | {len(paths)} | {size:.0f} | {np.median(cpu[name]):.1f} | {min(cpu[name]):.1f} | "
              f"{user * 1e3:.1f} | {system * 1e3:.1f} | {faults:.0f} |")
    return cpu


if __name__ == "__main__":
    main()
