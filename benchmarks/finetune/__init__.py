"""Fine-tuning study of svi_kernels' optimizers (the ``svi-finetune`` command).

Modules, one job each: ``data`` (download, cache, split), ``model`` (BERT + HF-style head, trainable
top), ``features`` (frozen-part caching), ``optimizers`` (name -> optimizer), ``train`` (one run),
``claims`` (the three protocols), ``report`` (JSON, plots, Markdown), ``cli``.
Imports are relative so the package works as ``benchmarks.finetune`` and ``svi_kernels._benchmarks.finetune``.
"""
