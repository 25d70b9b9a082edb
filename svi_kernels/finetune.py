"""Entry point of ``svi-finetune`` / ``python -m svi_kernels.finetune`` (the code lives in benchmarks/finetune/)."""
from __future__ import annotations

import os
import sys
from typing import List, Optional


def _cli():
    try:  # installed: benchmarks/ ships as svi_kernels._benchmarks
        from svi_kernels._benchmarks.finetune import cli
        return cli
    except ImportError:
        pass
    try:  # a checkout: benchmarks/ beside the package
        from benchmarks.finetune import cli
        return cli
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(root, "benchmarks", "finetune")):
            raise
        sys.path.insert(0, root)
        from benchmarks.finetune import cli
        return cli


def main(argv: Optional[List[str]] = None) -> int:
    return _cli().main(argv)


if __name__ == "__main__":
    sys.exit(main())
