"""mokd: Multi-mode Online Knowledge Distillation (MOKD, CVPR 2023) training engine."""

__version__ = "0.1.0"
