"""Puts benchmarks/ on sys.path, so that a diagnostic run as `python benchmarks/diagnostics/<name>.py` imports the
benchmarks' shared helpers (common.py) and scripts (utility.py, lr_sweep.py) as the benchmarks do."""

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[1])
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
