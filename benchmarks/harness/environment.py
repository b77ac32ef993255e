"""Where and on what a run happens: the repository's folders, the git commit, the device, versions."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Runs write to an untracked folder (git-ignored) unless asked to record: benchmarks/results/ holds only the
# tables someone chose to commit (--results, or `merge` of a GPU suite's folder).
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "out")
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


# ----------------------------------------------------------------------------------------- environment

def _git(*cmd) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    commit = _git("rev-parse", "--short=12", "HEAD")
    if not commit:  # a copy of the tree without .git (e.g. on a lent GPU machine): the caller may say it
        return os.environ.get("GIT_COMMIT", "").strip() or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return out.strip().splitlines()[0]
    except Exception:
        return ""


def env_record(device) -> dict:
    """Date, device, versions and commit, as stored with every result row."""
    dev = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        device_name = torch.cuda.get_device_name(idx)
    else:
        device_name = f"CPU {_cpu_name()} ({os.cpu_count()} threads visible, torch uses {torch.get_num_threads()})"
    try:
        import xformers
        xformers_version = xformers.__version__
    except Exception:
        xformers_version = "none"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "driver": _driver_version() if dev.type == "cuda" else "",
        "xformers": xformers_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "host": platform.node(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


def device_tag(device) -> str:
    """Short file-name tag: cpu, h100, h200, a100, or the GPU's name in lower case."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    for known in ("h200", "h100", "a100", "l40s", "a10g", "l4", "v100", "t4"):
        if known in name.lower():
            return known
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
