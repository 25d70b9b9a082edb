"""Kernel microbenchmark of svi_kernels (the ``svi-bench`` command).

Installed as ``svi_kernels._benchmarks``; run from a checkout as ``benchmarks``. Modules import each
other relatively so both names work.
"""
