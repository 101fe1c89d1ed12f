"""Parallelism applied from outside the model, over one explicit DeviceMesh (see state.py for the layout)."""

from .state import ParallelSizes, ParallelState, check_size_flags

__all__ = ["ParallelSizes", "ParallelState", "check_size_flags"]
