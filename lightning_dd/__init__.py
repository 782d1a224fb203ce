"""lightning_dd: dataset distillation and efficient-learning research on PyTorch Lightning + Hydra.

Subpackages: ``data`` (DataModules and on-disk readers), ``nets`` (architectures by name),
``augment`` (DSA, ZCA), ``methods`` (one module per paper), ``evaluate`` (the shared student
evaluator, graph evaluation, LED), ``results`` (saved artifacts), ``compare`` (run tables).
"""
__version__ = "0.1.0"
