"""Host time of one FusedPILoTSGD step: the Python around the kernel, with the kernel itself excluded.

    python -m bench.host_time                        # ResNet-18 and ResNet-50 parameters
    python -m bench.host_time --models resnet50 --samples 9 --steps 300

On a GPU the kernel of a ResNet-50 step takes about 310 us (H100), so the host side matters. Measured without a
GPU: the Triton path under TRITON_INTERPRET=1 with the launch replaced by a no-op, so that only the host work of
``step()`` is timed (finding the gradients, checking for outside writes, the table cache, the launcher's
arguments). Each sample is the mean of ``--steps`` back-to-back steps on fixed random gradients; the median and
the minimum over samples are printed. The minimum is the figure to compare on a busy machine.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when pilot_kernels is imported: the Triton path on CPU tensors

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Sequence  # noqa: E402

import torch  # noqa: E402

from pilot import FusedPILoTSGD  # noqa: E402
from pilot_kernels import pilot_sgd  # noqa: E402

from .contenders import build_template, model_spec  # noqa: E402


def host_time_us(model: torch.nn.Module, samples: int, steps: int) -> list[float]:
    """Microseconds per step, one figure per sample, with the kernel launch replaced by a no-op."""
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, alpha=1e-4,
                              backend="triton")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    launch, pilot_sgd.launch_pilot_sgd = pilot_sgd.launch_pilot_sgd, lambda *args, **kwargs: None
    try:
        for _ in range(20):  # first steps build the tables
            optimizer.step()
        result = []
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            result.append((time.perf_counter() - start) / steps * 1e6)
        return result
    finally:
        pilot_sgd.launch_pilot_sgd = launch


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300, help="steps per sample")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.models:
        times = host_time_us(build_template(model_spec(name)), args.samples, args.steps)
        print(f"{name}: host time per step {statistics.median(times):.1f} us median, {min(times):.1f} us min "
              f"({args.samples} samples of {args.steps} steps)")


if __name__ == "__main__":
    main()
