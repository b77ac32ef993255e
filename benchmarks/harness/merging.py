"""Adding a run made elsewhere (e.g. the GPU suite's results folder) to the recorded results."""

from __future__ import annotations

import os

from .environment import RESULTS_DIR
from .records import append_csv, read_csv


def merge(src: str, dest: str = RESULTS_DIR) -> list[str]:
    """Adds the results of a run made elsewhere (e.g. the GPU suite's results folder) to ``dest``: CSV rows
    appended to ``dest/<name>.csv`` (partial files included, under their own name), markdown tables and
    plots copied. Returns the files written."""
    import shutil

    written = []
    os.makedirs(dest, exist_ok=True)
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".csv"):
            rows = read_csv(path)
            target = os.path.join(dest, entry)
            append_csv(rows, target)
            written.append(target)
        elif entry.endswith((".md", ".png")):
            shutil.copy2(path, os.path.join(dest, entry))
            written.append(os.path.join(dest, entry))
    return written
