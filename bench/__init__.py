"""bench: what PILoT costs over dense training (time, peak memory, memory traffic, launches, the compiled kernel).

Run ``python -m bench`` (see ``bench/__main__.py``); micro-benchmarks: ``pytest bench/ --benchmark-only``.
Nothing is imported here, so that ``python -m bench`` can drop TRITON_INTERPRET before pilot_kernels is imported.
"""
