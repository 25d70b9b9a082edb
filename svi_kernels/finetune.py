"""Entry point of ``svi-finetune`` / ``python -m svi_kernels.finetune`` (the code lives in benchmarks/finetune/)."""
from __future__ import annotations

import sys
from typing import List, Optional

from ._entry import load


def main(argv: Optional[List[str]] = None) -> int:
    return load("finetune.cli").main(argv)


if __name__ == "__main__":
    sys.exit(main())
