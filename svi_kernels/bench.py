"""Entry point of ``svi-bench`` / ``python -m svi_kernels.bench`` (the code lives in benchmarks/)."""
from __future__ import annotations

import os
import sys
from typing import List, Optional


def _microbench():
    try:  # installed: benchmarks/ ships as svi_kernels._benchmarks
        from svi_kernels._benchmarks import microbench
        return microbench
    except ImportError:
        pass
    try:  # a checkout: benchmarks/ beside the package
        from benchmarks import microbench
        return microbench
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(root, "benchmarks")):
            raise
        sys.path.insert(0, root)
        from benchmarks import microbench
        return microbench


def main(argv: Optional[List[str]] = None) -> int:
    return _microbench().main(argv)


if __name__ == "__main__":
    sys.exit(main())
