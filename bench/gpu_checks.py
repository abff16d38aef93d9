"""Parts 1 and 2 of ``python -m bench.gpu``, the correctness checks: the CUDA tests with compiled kernels, and
FusedPILoTSGD trained against the eager reference (:mod:`pilot.reference`) on the same batches.

Parity trains two copies of one model from the same initialisation on the same random batches, under the same
per-step schedule (lr by LambdaLR, alpha edited at every step): FusedPILoTSGD (the compiled Triton kernel on a
GPU), and the model parametrised as x = m * w trained by ``torch.optim.SGD(weight_decay=alpha)`` on the factors. A
case passes when, after its last step,

* every tensor the reference trains (factors, plain parameters) is within ``tolerance`` of pilot's, relative to how
  far training moved it: :math:`\\lVert p - q \\rVert_2 / \\lVert q - q_0 \\rVert_2` (fp32 training is expected to
  agree to a few ulps, since the kernel computes SGD's multiply-adds as fmas in SGD's order; in bf16 a difference of
  an ulp in m * w can flip the rounding of x, which feeds back through the loss);
* every factorised parameter holds exactly round(m * w) in its dtype, as the compiled kernel writes it;
* :meth:`FusedPILoTSGD.l1_norm` and :meth:`density` equal the sums over the parameters (l1 within 1e-5).
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from pilot import FusedPILoTSGD, is_factorised
from pilot.models import build_model
from pilot.reference import factor_pairs, parametrize_model, reference_param_groups

from .contenders import IMAGENET_MODELS

REPO = Path(__file__).resolve().parent.parent
CUDA_TESTS = "tests/test_cuda.py"
OUTPUT_TAIL = 4000  # characters of a failed subprocess's output kept in the JSON


# ------------------------------------------------------------------------------------------ 1. the CUDA tests


def cuda_tests(out: Path, timeout: float) -> dict[str, Any]:
    """``pytest tests/test_cuda.py`` in a subprocess with the compiled kernels (PILOT_REAL_KERNELS=1, no
    TRITON_INTERPRET): parity, sync-debug mode, CUDA-graph capture and replay under a per-step schedule, streams.
    On a machine without a GPU every test skips. Passes when pytest exits 0."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PILOT_REAL_KERNELS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))  # pilot from the checkout
    junit = out / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}",
               CUDA_TESTS]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                                check=False)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else ""
        return {"ok": False, "timed_out": timeout, "output_tail": output[-OUTPUT_TAIL:]}
    record: dict[str, Any] = {"ok": result.returncode == 0, "returncode": result.returncode,
                              "seconds": time.perf_counter() - started, **junit_counts(junit)}
    if not record["ok"] or record.get("skipped"):
        record["output_tail"] = (result.stdout + result.stderr)[-OUTPUT_TAIL:]
    return record


def junit_counts(path: Path) -> dict[str, Any]:
    """Tests, failures, errors and skips of a pytest JUnit XML report, and the names of the failed tests."""
    if not path.exists():
        return {}
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**{key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}, "failed": failed}


# ------------------------------------------------------------------------------------------ 2. parity


class SmallCNN(nn.Module):
    """Two convolutions with BatchNorm and a linear head: factorised 4-D and 2-D weights, plain biases and norms."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class ParityCase:
    model: str  # "small-cnn" or a pilot.models name
    dtype: str  # "float32", or "bfloat16" (a bf16 model trained with torch.amp.GradScaler)
    steps: int
    batch_size: int
    image_size: int
    tolerance: float  # distance to the reference allowed after the last step, relative to the training's movement
    backend: str = "auto"  # FusedPILoTSGD's: the Triton kernel on CUDA (the interpreter under TRITON_INTERPRET=1)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return make_model(self.model, self.image_size, classes=10)


def make_model(name: str, image_size: int, classes: Optional[int] = None) -> nn.Module:
    """A freshly initialised "small-cnn" (:class:`SmallCNN`) or :mod:`pilot.models` model; by default with
    ImageNet's 1000 classes for the ImageNet ResNets, else 10."""
    classes = classes or (1000 if name in IMAGENET_MODELS else 10)
    return SmallCNN(classes) if name == "small-cnn" else build_model(name, classes, 3, image_size)


# SGD with momentum and a per-step schedule: lr by a cosine LambdaLR, alpha multiplied by ALPHA_DECAY at every
# step. lr is lower than the paper's 0.1: ResNet-18 on random batches diverges at 0.05, and a diverging run amplifies
# rounding differences.
HYPER = dict(lr=0.02, momentum=0.9, weight_decay=5e-4)
ALPHA, BETA, ALPHA_DECAY = 1e-3, 1.0, 0.97


@contextmanager
def exact_torch_kernels() -> Iterator[None]:
    """TF32 off and cuDNN deterministic while the two sides train: differences must be pilot's, not torch's."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = saved


def parity_case(case: ParityCase, device: torch.device) -> dict[str, Any]:
    """Train pilot and the reference side by side for ``case.steps`` steps; the distances and checks above."""
    dtype = getattr(torch, case.dtype)
    template = case.build().to(device=device, dtype=dtype)
    pilot_model, reference_model = copy.deepcopy(template), copy.deepcopy(template)
    # bf16: every parameter factorised, so that both sides keep fp32 state (torch.optim.SGD would step plain bf16
    # parameters and their buffers in bf16, pilot in fp32: a difference of design that chaos amplifies)
    everything = dtype != torch.float32
    pilot = FusedPILoTSGD(pilot_model.parameters(), alpha=ALPHA, beta=BETA, reparam=True if everything else None,
                          backend=case.backend, **HYPER)
    parametrize_model(reference_model, beta=BETA, select=(lambda name, p: True) if everything else None)
    reference = torch.optim.SGD(reference_param_groups(reference_model, alpha=ALPHA, weight_decay=HYPER["weight_decay"]),
                                lr=HYPER["lr"], momentum=HYPER["momentum"])
    initial = {label: theirs.detach().double().clone()
               for label, _, theirs in _compared(pilot_model, pilot, reference_model)}
    sides = [(pilot_model, pilot, "alpha"), (reference_model, reference, "weight_decay")]  # alpha: in group 0
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / case.steps))  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, cosine) for _, optimizer, _ in sides]
    scalers = [torch.amp.GradScaler(device.type) if dtype == torch.bfloat16 else None for _ in sides]
    generator = torch.Generator().manual_seed(1)
    losses: list[list[float]] = [[], []]
    for step in range(case.steps):
        x = torch.randn(case.batch_size, 3, case.image_size, case.image_size, generator=generator)
        y = torch.randint(0, 10, (case.batch_size,), generator=generator)
        x, y = x.to(device, dtype), y.to(device)
        for (model, optimizer, key), scaler, scheduler, history in zip(sides, scalers, schedulers, losses):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x).float(), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            optimizer.param_groups[0][key] = ALPHA * ALPHA_DECAY ** (step + 1)
            history.append(loss.detach())
    distances = _distances(_compared(pilot_model, pilot, reference_model), initial)
    worst = max(distances, key=distances.get)
    rounded = _rounded_product(pilot)
    telemetry = _telemetry_error(pilot)
    return {"case": asdict(case), "device": str(device), "max_distance": distances[worst], "worst": worst,
            "bit_identical": all(d == 0 for d in distances.values()), "rounded_product": rounded,
            "l1_relative_error": telemetry[0], "density_exact": telemetry[1],
            "loss_pilot": [float(v) for v in losses[0]], "loss_reference": [float(v) for v in losses[1]],
            "ok": distances[worst] <= case.tolerance and rounded and telemetry[0] <= 1e-5 and telemetry[1]}


def _compared(pilot_model: nn.Module, pilot: FusedPILoTSGD, reference_model: nn.Module) -> Iterator[
        tuple[str, Tensor, Tensor]]:
    """(label, pilot's tensor, the reference's) for every tensor the reference trains: factors m, w, plain
    parameters."""
    pairs = factor_pairs(reference_model)
    reference_parameters = dict(reference_model.named_parameters())
    for name, p in pilot_model.named_parameters():
        if name in pairs:
            for key, factor in zip("mw", pairs[name]):
                yield f"{name}.{key}", pilot.state[p][key], factor
        else:
            yield name, p, reference_parameters[name]


def _distances(compared: Iterator[tuple[str, Tensor, Tensor]], initial: dict[str, Tensor]) -> dict[str, float]:
    """||pilot's - the reference's|| relative to how far the reference moved the tensor from ``initial`` (its norm
    where it did not move): scale-free, so that a norm's bias that starts at 0 counts as much as a conv weight."""
    distances = {}
    for label, ours, theirs in compared:
        ours, theirs = ours.detach().double(), theirs.detach().double()
        scale = float((theirs - initial[label]).norm()) or float(theirs.norm()) or 1.0
        distances[label] = float((ours - theirs).norm()) / scale
    return distances


def _rounded_product(optimizer: FusedPILoTSGD) -> bool:
    """Every factorised parameter holds round(m * w) in its dtype, exactly."""
    return all(torch.equal(p.detach(), (optimizer.state[p]["m"] * optimizer.state[p]["w"]).to(p.dtype))
               for group in optimizer.param_groups for p in group["params"] if is_factorised(optimizer, p))


def _telemetry_error(optimizer: FusedPILoTSGD) -> tuple[float, bool]:
    """(relative error of l1_norm() against sum |x| in fp64, whether density() is the exact fraction of non-zeros)."""
    weights = [p.detach() for group in optimizer.param_groups for p in group["params"] if is_factorised(optimizer, p)]
    l1 = sum(float(p.double().abs().sum()) for p in weights)
    nonzero = sum(int((p != 0).sum()) for p in weights)
    total = sum(p.numel() for p in weights)
    return abs(optimizer.l1_norm() - l1) / l1, optimizer.density() == nonzero / total


def parity(cases: list[ParityCase], device: torch.device) -> dict[str, Any]:
    """Every case; ok when all are."""
    with exact_torch_kernels():
        results = [parity_case(case, device) for case in cases]
    return {"ok": all(r["ok"] for r in results), "cases": results}
