"""``fsdp_compile.estimate(...)``: will it fit, and how much does each rank send? One compiled
training step simulated at any world size in one process (fake process group, fake tensors).
``python -m fsdp_compile.estimate --help`` is its command line (``__main__.py``)."""
from .simulate import Estimate, RankReport, estimate, schedule_fingerprint

__all__ = ["Estimate", "RankReport", "estimate", "schedule_fingerprint"]
