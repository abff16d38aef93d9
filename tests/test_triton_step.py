"""The Triton path's host side: what a step uploads, on which device it launches, and the guards around CUDA graph
capture.

The kernel runs in Triton's interpreter on CPU tensors here, where an upload is a plain copy; every upload goes
through ``pilot.triton_step.upload``, which the tests count. The same checks on a GPU (the pinned, non-blocking
copies under ``torch.cuda.set_sync_debug_mode("error")``, two devices, real graph capture) are in test_cuda.py.
"""
from __future__ import annotations

import collections
import contextlib
import copy
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn

import pilot.optim
from pilot import FusedPILoTSGD, triton_step
from parity import buckets
from test_parity import SmallCNN, cnn_loss

OPTIONS = dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3)
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts the tables uploaded, by name ("tensor table", "block table", "hyper table")."""
    counter: collections.Counter = collections.Counter()
    upload = triton_step.upload

    def counting(table: str, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        counter[table] += 1
        return upload(table, device, build)

    monkeypatch.setattr(triton_step, "upload", counting)
    return counter


@contextlib.contextmanager
def no_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail on any read of a tensor's value by the host (a sync on a GPU)."""
    def host_read(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the step read a tensor's value on the host")

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, host_read)
        yield


def grad_addresses(model: nn.Module) -> list[int]:
    return [p.grad.data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("capturable", [False, True])
def test_steady_step_under_a_per_step_schedule_uploads_only_what_changed(
        capturable: bool, set_to_none: bool, uploads: collections.Counter, monkeypatch: pytest.MonkeyPatch) -> None:
    """lr (LambdaLR, as pilot.train schedules it) and alpha change at every step: after the first step, a step
    reads nothing on the host and uploads the hyper table with the new numbers (one small copy, no kernel) or, with
    capturable=True, nothing (the device copies the lr and alpha tensors into it). The tensor table follows
    gradients that the allocator moved (zero_grad(set_to_none=True) frees them; on CPU they tend to move at every
    step), one upload per step where they moved."""
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=capturable, **OPTIONS)
    host_model = copy.deepcopy(model)
    host = FusedPILoTSGD(host_model.parameters(), backend="eager", **OPTIONS)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.8 ** step) for o in (optimizer, host)]
    moved = 0
    addresses: list[int] = []
    for step in range(5):
        for m, o in ((model, optimizer), (host_model, host)):
            o.zero_grad(set_to_none=set_to_none)
            cnn_loss(step)(m).backward()
            alpha = 1e-2 * 1.5 ** step
            if isinstance(o.param_groups[0]["alpha"], torch.Tensor):
                o.param_groups[0]["alpha"].fill_(alpha)
            else:
                o.param_groups[0]["alpha"] = alpha
        if step == 0:
            optimizer.step()  # the first step builds the tables
            uploads.clear()
        else:
            moved += grad_addresses(model) != addresses
            with no_host_reads(monkeypatch):
                optimizer.step()
        addresses = grad_addresses(model)
        host.step()
        for scheduler in schedulers:
            scheduler.step()
    expected = collections.Counter({"tensor table": moved, "hyper table": 0 if capturable else 4})
    assert uploads == +expected
    assert set_to_none or not moved
    for p, q in zip(model.parameters(), host_model.parameters()):  # the new lr and alpha reached every step
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # the interpreter's fma rounds twice


def test_gradients_at_new_addresses_update_only_the_tensor_table(uploads: collections.Counter) -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    cnn_loss(0)(model).backward()
    optimizer.step()
    uploads.clear()
    for p in model.parameters():
        p.grad = p.grad.clone()  # same values, new addresses
    optimizer.step()
    assert uploads == {"tensor table": 1}


def test_gradients_of_another_layout_are_copied_into_a_fixed_buffer(uploads: collections.Counter) -> None:
    """A transposed gradient made afresh at every step reaches the kernel through one buffer at a fixed address."""
    weight = nn.Parameter(torch.randn(6, 5))
    optimizer = FusedPILoTSGD([weight], **OPTIONS)
    for step in range(3):
        weight.grad = torch.randn(5, 6).t()
        with pytest.warns(RuntimeWarning, match="memory layout") if step == 0 else contextlib.nullcontext():
            optimizer.step()
        if step == 0:
            uploads.clear()
    assert not uploads


def test_block_tables_are_bounded_and_the_recent_ones_kept(uploads: collections.Counter,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """One block table per set of parameters with gradients, at most BLOCK_TABLES_KEPT, least recently used
    dropped first."""
    monkeypatch.setattr(triton_step, "BLOCK_TABLES_KEPT", 2)
    params = [nn.Parameter(torch.randn(3, size)) for size in (1, 2, 3)]
    optimizer = FusedPILoTSGD(params, **OPTIONS)
    (_, bucket), = buckets(optimizer)

    def step_only(*indices: int) -> None:
        for index, p in enumerate(params):
            p.grad = torch.ones_like(p) if index in indices else None
        optimizer.step()

    for indices in ((0,), (1,), (0,), (2,), (0,)):  # (1,) is the least recently used when (2,) comes
        step_only(*indices)
    assert uploads["block table"] == 3 and len(bucket.backend.block_tables) == 2
    step_only(1)
    assert uploads["block table"] == 4


def test_the_launch_enters_the_buckets_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device and its current stream: each bucket's launch (and its uploads)
    run inside on_device(bucket.device)."""
    entered: list[torch.device] = []
    inside: list[torch.device] = []
    launches: list[torch.device] = []

    @contextlib.contextmanager
    def recording(device: torch.device) -> Iterator[None]:
        entered.append(device)
        inside.append(device)
        yield
        inside.pop()

    launch = triton_step.kernel.launch_pilot_sgd

    def recording_launch(*args: Any, **kwargs: Any) -> None:
        launches.append(inside[-1])
        launch(*args, **kwargs)

    monkeypatch.setattr(triton_step, "on_device", recording)
    monkeypatch.setattr(triton_step.kernel, "launch_pilot_sgd", recording_launch)
    model = nn.Linear(4, 3)
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    cnn = SmallCNN().to(torch.bfloat16)  # a second bucket
    optimizer.add_param_group({"params": list(cnn.parameters())})
    for p in [*model.parameters(), *cnn.parameters()]:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert entered == launches == [bucket.device for _, bucket in buckets(optimizer)]


def test_on_device_makes_a_cuda_device_current(monkeypatch: pytest.MonkeyPatch) -> None:
    made_current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: made_current.append(device) or contextlib.nullcontext())
    with triton_step.on_device(torch.device("cuda", 1)):
        pass
    with triton_step.on_device(torch.device("cpu")):
        pass
    assert made_current == [torch.device("cuda", 1)]


@contextlib.contextmanager
def capture(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pretend that the current CUDA stream is capturing a graph (on CPU tensors, nothing is captured): the
    optimizer's check, and upload's, which refuses to copy a table from the host during capture."""
    with monkeypatch.context() as patch:
        for module in (pilot.optim, triton_step):
            patch.setattr(module, "capture_underway", lambda devices=(): True)
        yield


def train_step(model: nn.Module, optimizer: FusedPILoTSGD, seed: int) -> None:
    optimizer.zero_grad(set_to_none=False)
    cnn_loss(seed)(model).backward()
    optimizer.step()


def test_capturing_a_step_without_capturable_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """As torch's optimizers do: lr and alpha would be frozen into the graph."""
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    train_step(model, optimizer, 0)
    before = [p.clone() for p in model.parameters()]
    with capture(monkeypatch), pytest.raises(RuntimeError, match="capturable is False.*capturable=True"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def captured_optimizer(monkeypatch: pytest.MonkeyPatch, **options: Any) -> tuple[nn.Module, FusedPILoTSGD]:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=True, **{**OPTIONS, **options})
    train_step(model, optimizer, 0)
    with capture(monkeypatch):
        train_step(model, optimizer, 1)
    return model, optimizer


def test_after_a_capture_laying_the_state_out_again_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A captured graph keeps the addresses of the state's storage and tables: whatever would free them raises
    (and leaves the optimizer as it was), what keeps them works."""
    model, optimizer = captured_optimizer(monkeypatch)
    saved = optimizer.state_dict()
    layout = optimizer._layout
    with pytest.raises(RuntimeError, match="load_state_dict lays the optimizer's state out again.*capture"):
        optimizer.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="add_param_group lays"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(3, 2))]})
    assert optimizer._layout is layout and len(optimizer.param_groups) == 1
    train_step(model, optimizer, 2)  # steps, telemetry and state dicts keep the memory
    assert optimizer.l1_norm() > 0 and optimizer.state_dict()["state"]
    model.conv.weight.data = model.conv.weight.data.to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="another memory layout.*lays the optimizer's state out again"):
        optimizer.l1_norm()
    assert optimizer._layout is layout
    resumed = FusedPILoTSGD(copy.deepcopy(model).parameters(), capturable=True)
    resumed.load_state_dict(saved)  # what the message suggests


def test_after_a_capture_switching_momentum_on_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = captured_optimizer(monkeypatch, momentum=0.0)
    optimizer.param_groups[0]["momentum"] = 0.9  # its buffers need storage
    with pytest.raises(RuntimeError, match="momentum switched on"):
        train_step(model, optimizer, 2)


def test_a_capturable_checkpoint_loads_as_numbers() -> None:
    """Without capturable, lr and alpha are numbers, as LR schedulers expect (a tensor read at every step would
    sync with the device)."""
    model = SmallCNN()
    capturable = FusedPILoTSGD(model.parameters(), capturable=True, **OPTIONS)
    train_step(model, capturable, 0)
    optimizer = FusedPILoTSGD(copy.deepcopy(model).parameters())
    optimizer.load_state_dict(capturable.state_dict())
    group = optimizer.param_groups[0]
    assert (group["lr"], group["alpha"]) == (pytest.approx(0.05), pytest.approx(1e-2))
    assert not isinstance(group["lr"], torch.Tensor) and not isinstance(group["alpha"], torch.Tensor)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_cuda_parameters_are_refused_when_the_kernel_is_interpreted(backend: str) -> None:
    """TRITON_INTERPRET=1 (as in this suite): the interpreter runs the kernel on the host, where the tables' CUDA
    addresses would be dereferenced (a segfault). The path is chosen per device when the state is laid out; there
    is no CUDA device here, so the choice is asked for directly."""
    optimizer = FusedPILoTSGD([nn.Parameter(torch.randn(3))], backend=backend)
    with pytest.raises(ValueError, match="on cuda:0: TRITON_INTERPRET=1.*unset TRITON_INTERPRET"):
        optimizer._path_for(torch.device("cuda", 0))
    assert FusedPILoTSGD([nn.Parameter(torch.randn(3))], backend="compile")._path_for(torch.device("cuda")) == "compile"


def test_one_element_tensor_hyper_parameters_are_read_only_when_they_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """momentum, dampening and weight_decay may be one-element tensors, as torch.optim accepts them: the host reads
    them (a sync for a CUDA tensor) at the first step and after an in-place change, not at every step."""
    values = dict(momentum=0.9, dampening=0.1, weight_decay=1e-3)
    tensors = {key: torch.tensor(value) for key, value in values.items()}
    model = SmallCNN()
    twin = copy.deepcopy(model)
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.05, alpha=1e-2, **tensors)
    numbers = FusedPILoTSGD(twin.parameters(), lr=0.05, alpha=1e-2, **values)
    for step in range(5):
        for m, o in ((model, optimizer), (twin, numbers)):
            o.zero_grad()
            cnn_loss(step)(m).backward()
        if step in (0, 3):  # the first step, and the first after the change below: read
            optimizer.step()
        else:
            with no_host_reads(monkeypatch):
                optimizer.step()
        numbers.step()
        if step == 2:
            tensors["momentum"].fill_(0.5)
            numbers.param_groups[0]["momentum"] = 0.5
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_stream_switch_records_every_kept_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a switch of streams (a warm-up on a side stream, then the main one), every block table kept from the
    old stream is recorded on the new one, not only the current: one may be picked again later, and its memory
    must not go back to the old stream while the new stream's kernels may still read it. (On CPU tensors the
    stream machinery is stood in for.)"""
    params = [nn.Parameter(torch.randn(3, size)) for size in (1, 2)]
    optimizer = FusedPILoTSGD(params, **OPTIONS)
    for indices in ((0,), (1,), (0, 1)):  # three sets of parameters with gradients: three block tables
        for index, p in enumerate(params):
            p.grad = torch.ones_like(p) if index in indices else None
        optimizer.step()
    (_, bucket), = buckets(optimizer)
    backend = bucket.backend
    recorded: list[tuple[int, str]] = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "main")
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: recorded.append((t.data_ptr(), stream)))
    backend._use_on_current_stream(bucket, [backend.tensor_table[1], backend.hyper_table[1], backend.block_table])
    assert len(backend.block_tables) == 3
    assert {(table.data_ptr(), "main") for table in backend.block_tables.values()} <= set(recorded)


def test_one_cycle_momentum_reaches_the_table_without_an_upload_under_capture(
        uploads: collections.Counter, monkeypatch: pytest.MonkeyPatch) -> None:
    """OneCycleLR (and CyclicLR) assign a new momentum number at every step. Without capturable the hyper table is
    uploaded anew, one copy and nothing else; with capturable=True the changed cells are written on the device, so
    that a step captured in a CUDA graph does not raise (there is no copy from the host to capture), and training
    equals the host path's."""
    models = [SmallCNN() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [FusedPILoTSGD(m.parameters(), capturable=capturable, **OPTIONS)
                  for m, capturable in zip(models, (False, True))]
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10) for o in optimizers]
    for step in range(4):
        if step == 1:
            uploads.clear()
        for model, optimizer, scheduler in zip(models, optimizers, schedulers):
            with capture(monkeypatch) if optimizer._capturable and step == 3 else contextlib.nullcontext():
                train_step(model, optimizer, step)
            scheduler.step()
    assert uploads == {"hyper table": 3}  # the host path's; the capturable one uploaded nothing
    assert optimizers[1].param_groups[0]["momentum"] != optimizers[1].defaults["momentum"]
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_settling_momentum_reads_one_slot_per_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a parameter's first momentum step ran is in its first block's momentum_started slot: a state dict
    reads those (a sync on a GPU), not the whole array of a slot per 1024 elements."""
    params = [nn.Parameter(torch.randn(5, 1000)), nn.Parameter(torch.randn(3))]
    optimizer = FusedPILoTSGD(params, **OPTIONS)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    (_, bucket), = buckets(optimizer)
    assert bucket.started.numel() == 6
    read: list[int] = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: read.append(t.numel()) or tolist(t))
    state = optimizer.state_dict()
    assert read == [2] and all(entry["momentum_started"] for entry in state["state"].values())


def test_a_capture_that_raised_leaves_the_state_free_to_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a step that completed under capture pins the state's memory: a capture whose step raised (here at a
    number assigned to alpha) leaves nothing in a graph, so the state may still be laid out again."""
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=True, **OPTIONS)
    train_step(model, optimizer, 0)
    alpha, optimizer.param_groups[0]["alpha"] = optimizer.param_groups[0]["alpha"], 0.5
    with capture(monkeypatch), pytest.raises(TypeError, match="alpha was set to float"):
        train_step(model, optimizer, 0)
    optimizer.param_groups[0]["alpha"] = alpha
    optimizer.load_state_dict(optimizer.state_dict())
    train_step(model, optimizer, 1)
    with capture(monkeypatch):
        train_step(model, optimizer, 2)
    with pytest.raises(RuntimeError, match="load_state_dict lays the optimizer's state out again"):
        optimizer.load_state_dict(optimizer.state_dict())


def test_capture_is_looked_for_on_every_device_of_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """With several GPUs the current device may not be the one whose stream captures: each CUDA device of the
    state is asked. (torch.cuda is stood in for.)"""
    current = [0]

    @contextlib.contextmanager
    def device(index: Any) -> Iterator[None]:
        current.append(torch.device(index).index)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: current[-1] == 1)
    assert not triton_step.capture_underway()  # device 0, the current one, is not capturing
    assert triton_step.capture_underway([torch.device("cuda", 0), torch.device("cuda", 1)])
    assert not triton_step.capture_underway([torch.device("cuda", 0)])
