"""Keep library internals off the main job's output: its stdout is the tables, its stderr the progress lines.

Two sources print on a machine without a GPU, and neither says anything about the benchmark:

* ``torch.utils.cpp_extension`` (imported by torch.compile, pilot's CPU step) logs "No CUDA runtime is found,
  using CUDA_HOME=..." when a CUDA toolkit is installed but no GPU is present. The bench builds no CUDA extension
  and says in its first line which device it measured, so that one record is dropped at its logger
  (:func:`pilot.quiet.drop_cuda_home_notice`, which python -m pilot.train uses too).
* The profiler behind the CPU memory measurement (Kineto, native code) writes its own log lines straight to file
  descriptor 2: ``profiler_start`` / ``profiler_stop`` markers and, without a GPU, "ERROR: gpuGetDeviceCount
  failed". :func:`kineto_log_captured` captures the descriptor around that measurement only and passes on every
  line that is not Kineto's; if the measurement fails, everything captured is passed on with the error.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

# Kineto's log prefix: "<LEVEL>:<date> <time> <pid>:<tid> <file>.cpp:<line>] ".
KINETO_LINE = re.compile(r"^(VERBOSE|INFO|WARNING|STAGE|ERROR|USDT):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ "
                         r"\S+\.cpp:\d+\] ")


@contextmanager
def kineto_log_captured() -> Iterator[None]:
    """Capture file descriptor 2 for the block; afterwards pass on what is not a Kineto log line.

    Descriptor-level, because Kineto writes from C++ and never goes through ``sys.stderr``.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = lines if failed else [line for line in lines if not KINETO_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
