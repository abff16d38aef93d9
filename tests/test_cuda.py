"""CUDA tests with the compiled kernels (skipped without a GPU).

The suite runs Triton's interpreter (conftest.py), which cannot follow the kernel's pointer tables into GPU
memory; so the launcher test re-runs this file in a subprocess with PILOT_REAL_KERNELS=1.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import CUDA, REAL_KERNELS
from parity import buckets, build_pair
from pilot import FusedPILoTSGD, triton_step
from test_optim import train
from test_parity import SmallCNN

pytestmark = CUDA
in_subprocess = pytest.mark.skipif(not REAL_KERNELS, reason="runs in the subprocess with compiled kernels")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
OPTIONS = dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3)


@pytest.fixture(autouse=True)
def _exact_torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The references run torch's convolutions and matmuls: TF32 and cuDNN's nondeterministic algorithms (conv
    backward may use atomics) would make them differ from pilot's results for reasons that are not pilot's."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@pytest.mark.skipif(REAL_KERNELS, reason="this is the launcher")
def test_cuda_suite_with_compiled_kernels() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PILOT_REAL_KERNELS"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@in_subprocess
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3),
                                     dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True, alpha=1e-3)])
def test_cuda_parity(options: dict, dtype: torch.dtype) -> None:
    pair = build_pair(SmallCNN().cuda().to(dtype), [(None, options)], backend="auto")
    assert all(path == "triton" for path, _ in buckets(pair.fused))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=generator).cuda().to(dtype)
    y = torch.randint(0, 7, (8,), generator=generator).cuda()
    sign = -1.0 if options.get("maximize") else 1.0
    # bf16 training drifts chaotically from its reference within ~10 steps (see test_mixed_precision.py)
    for _ in range(20 if dtype == torch.float32 else 3):
        pair.step(lambda model: sign * nn.functional.cross_entropy(model(x).float(), y))
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    pair.assert_close(**tolerance)


@in_subprocess
def test_state_dict_loads_across_cpu_and_cuda() -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-2, backend="eager")
    train(model, optimizer, 3)
    cuda_model = copy.deepcopy(model).cuda()
    cuda_optimizer = FusedPILoTSGD(cuda_model.parameters())
    cuda_optimizer.load_state_dict(optimizer.state_dict())
    for p, q in zip(model.parameters(), cuda_model.parameters()):
        for key, value in optimizer.state[p].items():
            assert value is None or torch.equal(value, cuda_optimizer.state[q][key].cpu())
    back = FusedPILoTSGD(SmallCNN().parameters(), backend="eager")
    back.load_state_dict(cuda_optimizer.state_dict())
    for p, q in zip(model.parameters(), back.param_groups[0]["params"]):
        assert torch.equal(p, q)


class CpuThenCuda(nn.Module):
    """One model, one parameter group, two devices: a bucket (and a path) per device."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(5, 3).cuda()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(z)).cuda())


@in_subprocess
def test_one_group_across_cpu_and_cuda() -> None:
    pair = build_pair(CpuThenCuda(), [(None, dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3))],
                      backend="auto")
    assert {(bucket.device.type, path) for path, bucket in buckets(pair.fused)} == {("cpu", "compile"),
                                                                                     ("cuda", "triton")}
    z, target = torch.randn(9, 6), torch.randn(9, 3).cuda()
    for _ in range(10):
        pair.step(lambda model: (model(z) - target).square().mean())
    pair.assert_close()


@in_subprocess
def test_cuda_graph_capture_and_replay() -> None:
    """capturable=True: forward, backward and step captured in one CUDA graph; replays equal eager steps, and
    lr (a LambdaLR, which fills the tensor in place) and alpha edited in place between replays reach the captured
    step."""
    options = dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3, capturable=True)
    model = SmallCNN().cuda()
    eager_model = copy.deepcopy(model)
    optimizer = FusedPILoTSGD(model.parameters(), **options)
    eager = FusedPILoTSGD(eager_model.parameters(), **options)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.8 ** step) for o in (optimizer, eager)]
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 6, 6, generator=generator).cuda(),
                torch.randint(0, 7, (8,), generator=generator).cuda()) for _ in range(8)]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def train_step(m: nn.Module, o: FusedPILoTSGD, x: torch.Tensor, y: torch.Tensor) -> None:
        o.zero_grad(set_to_none=False)  # gradients stay at their addresses, which the kernel table holds
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's documentation does
        for x, y in batches[:3]:
            train_step(model, optimizer, x, y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        train_step(eager_model, eager, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, optimizer, static_x, static_y)
    for step, (x, y) in enumerate(batches[3:]):
        for o, scheduler in zip((optimizer, eager), schedulers):
            scheduler.step()
            o.param_groups[0]["alpha"].fill_(1e-2 * 1.2 ** step)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        train_step(eager_model, eager, x, y)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in optimizer.state[p].items():
            torch.testing.assert_close(value, eager.state[q][key], rtol=1e-5, atol=1e-6)
    assert optimizer.l1_norm() == pytest.approx(eager.l1_norm(), rel=1e-5)


@in_subprocess
def test_model_moved_after_the_optimizer_is_a_clear_error() -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.05, momentum=0.9)
    model.cuda()  # param.data = param.data.cuda(): the optimizer's state stays on the CPU
    with pytest.raises(ValueError, match="changed device, dtype or shape"):
        optimizer.step()


def batch(seed: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 3, 6, 6, generator=generator).to(device),
            torch.randint(0, 7, (8,), generator=generator).to(device))


@in_subprocess
@pytest.mark.parametrize("capturable", [False, True])
def test_steady_step_never_syncs(capturable: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """lr (LambdaLR) and alpha change at every step, zero_grad(set_to_none=True) frees the gradients: after
    warm-up a step makes no synchronising call and uploads no table but the hyper table with the new numbers
    (capturable=False) and, where the allocator moved gradients, the tensor table (pinned and non-blocking, which
    sync debug mode does not flag)."""
    uploads: list[str] = []
    upload = triton_step.upload
    monkeypatch.setattr(triton_step, "upload", lambda table, *args: uploads.append(table) or upload(table, *args))
    model = SmallCNN().cuda()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=capturable, **OPTIONS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** step)
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        if capturable:
            optimizer.param_groups[0]["alpha"].fill_(1e-2 * 1.1 ** step)
        else:
            optimizer.param_groups[0]["alpha"] = 1e-2 * 1.1 ** step
        if step == 3:
            uploads.clear()
        torch.cuda.set_sync_debug_mode("error" if step >= 3 else "default")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scheduler.step()
    scheduled = set() if capturable else {"hyper table"}
    assert set(uploads) <= {"tensor table"} | scheduled
    for p in model.parameters():
        p.grad = p.grad.clone()  # new addresses: the tensor table is uploaded, pinned and non-blocking
    uploads.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sorted(uploads) == sorted(["tensor table", *scheduled])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@in_subprocess
@two_gpus
def test_a_bucket_on_a_device_that_is_not_the_current_one() -> None:
    """Triton launches on the current device: the step makes each bucket's device current for its launch."""
    pair = build_pair(SmallCNN().to("cuda:1"), [(None, OPTIONS)], backend="auto")
    x, y = batch(0, "cuda:1")
    with torch.cuda.device(0):
        for _ in range(5):
            pair.step(lambda model: nn.functional.cross_entropy(model(x), y))
    torch.cuda.synchronize(1)
    pair.assert_close(rtol=1e-5, atol=1e-6)


def warm_up_on_a_side_stream(model: nn.Module, optimizer: FusedPILoTSGD, steps: int = 3) -> None:
    """As torch.cuda.graph's documentation warms up before capturing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(steps):
            optimizer.zero_grad(set_to_none=False)
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)


@in_subprocess
def test_tables_of_a_side_stream_are_recorded_on_the_stream_that_uses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables built during a warm-up on a side stream, then used on the main stream, are recorded there, so that
    the allocator does not hand their memory to the side stream while the main stream still reads it."""
    model = SmallCNN().cuda()
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    warm_up_on_a_side_stream(model, optimizer)
    recorded: list[tuple[int, torch.cuda.Stream]] = []
    record_stream = torch.Tensor.record_stream
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, stream: recorded.append((t.data_ptr(), stream)) or record_stream(t, stream))
    optimizer.step()
    (_, bucket), = buckets(optimizer)
    backend, main = bucket.backend, torch.cuda.current_stream()
    for table in (backend.tensor_table[1], backend.hyper_table[1], backend.block_table, bucket.factors):
        assert (table.data_ptr(), main) in recorded


@in_subprocess
def test_capturing_a_step_without_capturable_raises() -> None:
    model = SmallCNN().cuda()
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    warm_up_on_a_side_stream(model, optimizer)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable is False"):
        with torch.cuda.graph(graph):
            optimizer.step()


@in_subprocess
def test_after_a_capture_load_state_dict_raises() -> None:
    """The graph writes to the state's current memory: laying it out again would free that memory."""
    model = SmallCNN().cuda()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=True, **OPTIONS)
    warm_up_on_a_side_stream(model, optimizer)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    graph.replay()
    with pytest.raises(RuntimeError, match="load_state_dict lays the optimizer's state out again"):
        optimizer.load_state_dict(optimizer.state_dict())
    graph.replay()
    torch.cuda.synchronize()


@in_subprocess
def test_one_cycle_momentum_under_capture() -> None:
    """OneCycleLR assigns a momentum number at every step: capturing such a step does not raise (the change is
    written on the device, nothing is copied from the host), and the replays train."""
    model = SmallCNN().cuda()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=True, **OPTIONS)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20)
    static_x, static_y = batch(0)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(static_x), static_y).backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            train_step()
            scheduler.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step()
    for _ in range(5):
        scheduler.step()
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@in_subprocess
def test_channels_last_1x1_convolutions_take_no_gradient_copies() -> None:
    """cuDNN may return a channels_last 1x1 conv weight's gradient with contiguous strides (autograd ignores the
    strides of size-1 dimensions): the same memory order, read in place, without a copy or a warning."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).cuda().to(memory_format=torch.channels_last)
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    x = torch.randn(8, 3, 6, 6, device="cuda").to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    (_, bucket), = buckets(optimizer)
    assert all(e.grad_stage is None for e in bucket.entries)
