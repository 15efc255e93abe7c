#!/usr/bin/env python
"""Thin wrapper: `python experiments/run_needle.py ...` == `cakekv eval needle ...` (works from a checkout)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cakekv.eval.needle import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
