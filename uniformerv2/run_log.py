"""What a training run records as it goes: ``metrics.jsonl`` / ``metrics.csv``, ``curves.png``, and the
share of time the loop waited for data."""

from __future__ import annotations

import csv
import json
import logging
import os
import time

logger = logging.getLogger("uniformerv2")


class MetricsLog:
    """Rows in ``metrics.jsonl`` (appended as they come) mirrored to ``metrics.csv``."""

    FIELDS = ["kind", "epoch", "step", "loss", "lr", "clips_per_s", "data_wait", "acc1", "acc5", "time_s"]

    def __init__(self, out_dir: str, enabled: bool, resume_step: int | None = None, redo_val: bool = False):
        """``resume_step``: keep the rows up to that step of an earlier run in the folder; ``redo_val``: except
        a validation row at that step (the validation runs again)."""
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.csv = os.path.join(out_dir, "metrics.csv")
        self.rows: list[dict] = []
        if enabled and resume_step is not None and os.path.exists(self.jsonl):
            with open(self.jsonl) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            self.rows = [r for r in rows if r["step"] < resume_step or (
                r["step"] == resume_step and not (redo_val and r["kind"] == "val"))]
        if enabled:
            with open(self.jsonl, "w") as fh:
                for r in self.rows:
                    fh.write(json.dumps(r) + "\n")

    def add(self, **row) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def write_csv(self) -> None:
        if not self.enabled:
            return
        with open(self.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)


def plot_curves(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss")
        axes[1].plot([r["step"] for r in val], [r["acc1"] for r in val], "o-", label="val top-1")
        axes[1].plot([r["step"] for r in val], [r["acc5"] for r in val], "s--", label="val top-5")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend()
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].set_ylim(0, 100)
    if val:
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no validation", ha="center", va="center", transform=axes[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class DataWait:
    """The host's time blocked on the DataLoader for the next batch, per log window: the window's length and
    the share of it spent waiting, and one warning (main process) the first time that share is large after an
    epoch's first window (which includes starting the workers). A step whose host waits for data leaves the
    GPU idle: decoding and augmenting real videos can feed fewer clips per second than a fused step consumes
    (benchmarks/data_pipeline.py). Waits and windows are read from the same ``clock``."""

    WARN_SHARE = 0.3

    def __init__(self, warn: bool, num_workers: int, clock=time.perf_counter):
        self.clock = clock
        self.seconds = 0.0
        self.window_start = clock()
        self.first_window = True
        self.warn = warn
        self.num_workers = num_workers

    def batches(self, loader):
        """``loader``'s batches (one epoch's), each one's wait added to ``seconds``; the epoch's first window
        starts here."""
        self.seconds, self.first_window, self.window_start = 0.0, True, self.clock()
        it = iter(loader)
        while True:
            start = self.clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.seconds += self.clock() - start
            yield batch

    def end_window(self) -> tuple[float, float]:
        """(the window's seconds, its share of waiting); the next window starts now."""
        now = self.clock()
        window = now - self.window_start
        share = min(1.0, self.seconds / max(window, 1e-9))
        first_window, self.first_window = self.first_window, False
        self.seconds, self.window_start = 0.0, now
        if self.warn and not first_window and share > self.WARN_SHARE:
            self.warn = False
            logger.warning("training waited %.0f%% of the time for data: raise data.num_workers (now %d) on free "
                           "cores, re-encode the videos with a keyframe every 16 frames (uniformerv2-reencode), "
                           "or measure the input pipeline with benchmarks/data_pipeline.py", 100 * share,
                           self.num_workers)
        return window, share
