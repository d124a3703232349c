"""Testing utilities: spawned gloo ranks, a reference GPT and the compiled-vs-eager parity harness."""
from .parity import ParityReport, ParityRow, check_parity

__all__ = ["ParityReport", "ParityRow", "check_parity"]
