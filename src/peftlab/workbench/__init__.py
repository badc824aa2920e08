"""The comparison workbench: train strategies side by side and show what each costs and buys."""

from .compare import compare

__all__ = ["compare"]
