"""Find the code of the console scripts: ``benchmarks/`` ships as ``svi_kernels._benchmarks`` when
installed, and sits beside the package in a checkout."""
from __future__ import annotations

import importlib
import os
import sys


def load(module: str):
    """Import ``benchmarks.<module>`` from the installed package or from the checkout."""
    try:
        return importlib.import_module(f"svi_kernels._benchmarks.{module}")
    except ImportError:
        pass
    try:
        return importlib.import_module(f"benchmarks.{module}")
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(root, "benchmarks")):
            raise
        sys.path.insert(0, root)
        return importlib.import_module(f"benchmarks.{module}")
