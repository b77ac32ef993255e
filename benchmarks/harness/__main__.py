"""``python benchmarks/harness summarize|variants|merge ...``: read recorded results back (harness.cli)."""

import os
import sys

if __package__ in (None, ""):  # run as a folder: make ``harness`` importable as the package it is
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.cli import _cli  # noqa: E402

_cli()
