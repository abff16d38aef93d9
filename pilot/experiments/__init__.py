"""Runnable experiments that reproduce the paper's small-scale results with the library's own optimizer."""
