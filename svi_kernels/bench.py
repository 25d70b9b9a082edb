"""Entry point of ``svi-bench`` / ``python -m svi_kernels.bench`` (the code lives in benchmarks/)."""
from __future__ import annotations

import sys
from typing import List, Optional

from ._entry import load


def main(argv: Optional[List[str]] = None) -> int:
    return load("microbench").main(argv)


if __name__ == "__main__":
    sys.exit(main())
