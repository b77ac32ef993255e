"""The digest of csrc/ that setup.py records when it builds the CUDA extension (standard library only: the
build script loads this file before the package is installed)."""

from __future__ import annotations

import hashlib
import os


def csrc_digest(root: str) -> str | None:
    """sha256 over the names and contents of root/csrc/*, or None when there is no csrc/ (a wheel install)."""
    folder = os.path.join(root, "csrc")
    if not os.path.isdir(folder):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()
