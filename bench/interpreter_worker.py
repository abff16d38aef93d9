"""Worker process of :func:`bench.traffic.fused_kernel_traffic`: the fused step counted in Triton's interpreter.

    TRITON_INTERPRET=1 python -m bench.interpreter_worker resnet20 [MODEL ...]   # prints JSON

TRITON_INTERPRET is read when the kernels are decorated (at import), hence a process of its own.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch

import pilot_kernels

from .contenders import Hyper, build_contenders, model_spec
from .traffic import count_fused_step


def main(models: list[str]) -> None:
    if not pilot_kernels.KERNELS_INTERPRETED:
        raise SystemExit("bench.interpreter_worker needs TRITON_INTERPRET=1 in its environment")
    counts = []
    for name in models:
        contender = build_contenders(model_spec(name), Hyper(), torch.device("cpu"), ("pilot",),
                                     pilot_backend_name="triton")["pilot"]
        counts.append(asdict(count_fused_step(contender, name)))
    json.dump(counts, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
