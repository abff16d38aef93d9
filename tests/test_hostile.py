"""Hostile input: every case either works as defined or fails with a clear error, and corrupts nothing."""
from __future__ import annotations

import copy
import math
import multiprocessing
import warnings

import pytest
import torch
from torch import nn

import pilot_kernels
from parity import buckets, build_pair
from pilot import FusedPILoTSGD, factorise, is_factorised
from pilot_kernels import pilot_sgd
from test_parity import BACKENDS, SmallCNN, cnn_loss

OPTIONS = dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def squared_loss(seed: int = 1, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    z, target = torch.randn(9, 6, generator=generator).to(dtype), torch.randn(9, 3, generator=generator)
    return lambda model: (model(z).float() - target).square().mean()


def snapshot(model: nn.Module, optimizer: FusedPILoTSGD) -> list[torch.Tensor]:
    """Every parameter and state tensor, copied."""
    return [t.detach().clone() for p in model.parameters() for t in (p, *optimizer.state[p].values()) if t is not None]


def assert_unchanged(model: nn.Module, optimizer: FusedPILoTSGD, before: list[torch.Tensor]) -> None:
    after = snapshot(model, optimizer)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))


# ---------------------------------------------------------------- non-finite gradients, extreme hyper-parameters


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_gradients_propagate_like_torch_sgd(backend: str) -> None:
    """No scaler: inf and NaN flow through the step exactly as through torch.optim.SGD on the factors."""
    pair = build_pair(mlp(), [(None, OPTIONS)], backend=backend)
    z = torch.randn(9, 6)
    weights = torch.ones(3)
    weights[0] = math.inf  # d loss / d output[:, 0] = inf: inf in the head's row 0, inf - inf = NaN further down
    pair.step(lambda model: (model(z) * weights).sum())
    head = pair.fused_model[2].weight
    assert head[0].isnan().any() or head[0].isinf().any()
    pair.step(squared_loss())  # and they stay
    pair.assert_close(equal_nan=True)
    assert math.isnan(pair.fused.l1_norm())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta, options", [
    (1e30, dict(lr=1e-31, momentum=0.9, alpha=1e-2)),  # m ~ 1e15, w ~ 1e-16: lr * m^2 is the effective lr
    (1e-30, dict(lr=0.05, momentum=0.9, alpha=1e-30)),
    (1.0, dict(lr=1e-3, momentum=0.9, alpha=1e2)),  # strong decay: factors shrink by 10% a step
    (1.0, dict(lr=0.05, momentum=0.9, alpha=1e30)),  # overflows to inf / NaN, exactly as the reference does
], ids=["huge-beta", "tiny-beta-alpha", "large-alpha", "overflowing-alpha"])
def test_extreme_beta_and_alpha_match_the_reference(backend: str, beta: float, options: dict) -> None:
    pair = build_pair(mlp(), [(None, options)], backend=backend, beta=beta)
    for seed in range(5):
        pair.step(squared_loss(seed))
    pair.assert_close(equal_nan=True)


@pytest.mark.parametrize("key", ["lr", "alpha", "beta", "weight_decay"])
def test_values_beyond_float32_are_rejected(key: str) -> None:
    """The step computes in fp32: a finite Python float that is inf in fp32 would silently wreck it."""
    with pytest.raises(ValueError, match=f"{key} value: 1e\\+39 does not fit in float32"):
        FusedPILoTSGD(mlp().parameters(), **{key: 1e39})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lr_zero_changes_no_weight_but_updates_momentum_like_torch(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter truncates instead of rounding: x may move by one ulp to trunc(m * w)")
    pair = build_pair(mlp().to(dtype), [(None, dict(OPTIONS, lr=0.0))], backend=backend)
    params = list(pair.fused_model.parameters())
    weights = [p.detach().clone() for p in params]
    factors = {(i, key): pair.fused.state[p][key].clone() for i, p in enumerate(params) for key in ("m", "w")
               if key in pair.fused.state[p]}
    telemetry = (pair.fused.l1_norm(), pair.fused.density())
    for seed in range(3):
        pair.step(squared_loss(seed, dtype))
    assert all(torch.equal(p, weight) for p, weight in zip(params, weights))
    assert factors and all(torch.equal(pair.fused.state[params[i]][key], factor) for (i, key), factor in factors.items())
    assert (pair.fused.l1_norm(), pair.fused.density()) == telemetry
    # torch.optim.SGD with lr = 0 still updates its momentum buffers: so do we, to the same values
    assert all(value is not None for p in params for value in pair.fused.state[p].values())
    pair.assert_close(**({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)))  # bf16: the reference's buffers


# ---------------------------------------------------------------- devices, dtypes, memory layouts, sizes


def test_meta_parameters_are_rejected_before_anything_changes() -> None:
    """A group may span devices (one bucket each, see test_cuda.py); the meta device has no data to factorise."""
    cpu = nn.Parameter(torch.randn(4, 3))
    before = cpu.detach().clone()
    with pytest.raises(ValueError, match="meta device"):
        FusedPILoTSGD([cpu, nn.Parameter(torch.empty(4, 3, device="meta"))])
    assert torch.equal(cpu, before)  # not factorised: the error came first


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_group_of_three_dtypes(backend: str) -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4).bfloat16(), nn.Linear(4, 3).half())
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    assert sorted(str(bucket.dtype) for _, bucket in buckets(optimizer)) == ["torch.bfloat16", "torch.float16",
                                                                             "torch.float32"]
    z = torch.randn(7, 6)
    for _ in range(3):
        optimizer.zero_grad()
        model[2](model[1](model[0](z).bfloat16()).half()).float().square().mean().backward()
        optimizer.step()
    for p in model.parameters():
        state = optimizer.state[p]
        assert all(v.dtype == torch.float32 for v in state.values())
        if is_factorised(optimizer, p):
            assert (p.detach().float() - (state["m"] * state["w"]).to(p.dtype).float()).abs().max() <= \
                p.detach().float().abs().max() * 2 ** -7


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_parameters_match_the_reference(backend: str) -> None:
    """channels_last weights are dense: the state follows their memory layout and the step walks memory order."""
    pair = build_pair(SmallCNN().to(memory_format=torch.channels_last), [(None, OPTIONS)], backend=backend)
    weight = pair.fused_model.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert pair.fused.state[weight]["m"].stride() == weight.stride()
    for _ in range(5):
        pair.step(cnn_loss())
    assert pair.fused.state[weight]["momentum_buffer_m"].stride() == weight.stride()
    pair.assert_close()


def twins(model: nn.Module, backend: str) -> tuple[list[nn.Module], list[FusedPILoTSGD]]:
    """model and a copy of it, each with its own optimizer."""
    models = [model, copy.deepcopy(model)]
    return models, [FusedPILoTSGD(m.parameters(), backend=backend, **OPTIONS) for m in models]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_any_layout_are_read_as_values(backend: str) -> None:
    """Transposed, strided and broadcast (stride 0) gradients are copied into the parameter's layout first, into
    one buffer per parameter (warned about once) whose fixed address keeps the kernel's tables valid."""
    models, optimizers = twins(mlp(), backend)
    with pytest.warns(RuntimeWarning, match="copied into the parameter's memory layout") as warned:
        for _ in range(3):
            grads = [torch.randn_like(p) for p in models[0].parameters()]
            grads[3] = torch.full((3,), 0.5)
            odd = [grads[0].t().contiguous().t(),  # transposed memory order
                   torch.stack([grads[1], grads[1]], dim=1)[:, 0],  # every other element of a buffer
                   grads[2].t().contiguous().t(),
                   torch.tensor([0.5]).expand(3)]  # one element, broadcast
            for model, optimizer, batch in zip(models, optimizers, (grads, odd)):
                for p, grad in zip(model.parameters(), batch):
                    p.grad = grad
                optimizer.step()
    assert len(warned) == len(odd)
    assert [g.stride() for g in odd] == [(1, 4), (2,), (1, 3), (0,)]
    assert_unchanged(models[1], optimizers[1], snapshot(models[0], optimizers[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
def test_strides_of_size_1_dimensions_are_not_another_layout(backend: str, scaled: bool) -> None:
    """A 1x1 conv weight is both contiguous and channels_last; autograd ignores the strides of its size-1 dimensions
    and may hand back a channels_last weight's gradient contiguous, or `.data` may be replaced so. Same memory
    order: read and stepped in place, without a copy, a warning or a new layout (an error after a capture)."""
    weight = nn.Parameter(torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last))
    twin = nn.Parameter(torch.empty(8, 4, 1, 1).copy_(weight))  # .contiguous() would keep weight's strides
    assert weight.stride() == (4, 1, 4, 4) and twin.stride() == (4, 1, 1, 1)
    optimizers = [FusedPILoTSGD([p], backend=backend, **OPTIONS) for p in (weight, twin)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            grad = torch.randn(8, 4, 1, 1)
            for p, optimizer in zip((weight, twin), optimizers):
                p.grad = grad.clone()  # contiguous: weight's differs in size-1 dimensions only
                if scaled:
                    optimizer.grad_scale, optimizer.found_inf = torch.tensor([2.0]), torch.zeros(1)
                address = p.grad.data_ptr()
                optimizer.step()
                assert p.grad.data_ptr() == address and torch.equal(p.grad, grad / 2 if scaled else grad)
            if step == 1:
                weight.data = torch.empty(8, 4, 1, 1).copy_(weight)  # the same order: the state stays put
                layout = optimizers[0]._layout
    assert optimizers[0]._layout is layout
    assert all(e.grad_stage is None for _, bucket in buckets(optimizers[0]) for e in bucket.entries)
    assert torch.equal(weight, twin)
    assert torch.equal(optimizers[0].state[weight]["momentum_buffer_m"], optimizers[1].state[twin]["momentum_buffer_m"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_replaced_by_another_memory_layout_is_followed(backend: str) -> None:
    models, optimizers = twins(SmallCNN(), backend)
    for step in range(4):
        if step == 2:
            weight = models[1].conv.weight
            weight.data = weight.data.to(memory_format=torch.channels_last)
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            cnn_loss(step)(model).backward()
            optimizer.step()
    weight = models[1].conv.weight
    assert optimizers[1].state[weight]["m"].stride() == weight.stride() != models[0].conv.weight.stride()
    for p, q in zip(models[0].parameters(), models[1].parameters()):  # a channels_last conv rounds differently
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in optimizers[0].state[p].items():
            torch.testing.assert_close(value, optimizers[1].state[q][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_element_parameters(backend: str) -> None:
    empty_weight = nn.Parameter(torch.empty(0, 5))  # factorised (ndim 2), nothing to step
    empty_bias = nn.Parameter(torch.empty(0))
    model = mlp()
    optimizer = FusedPILoTSGD([empty_weight, *model.parameters(), empty_bias], backend=backend, **OPTIONS)
    reference_model = copy.deepcopy(model)
    reference = FusedPILoTSGD(reference_model.parameters(), backend=backend, **OPTIONS)
    for seed in range(3):
        for m, o in ((model, optimizer), (reference_model, reference)):
            o.zero_grad()
            squared_loss(seed)(m).backward()
        empty_weight.grad, empty_bias.grad = torch.empty(0, 5), torch.empty(0)
        optimizer.step()
        reference.step()
    assert_unchanged(model, optimizer, snapshot(reference_model, reference))
    assert (optimizer.l1_norm(), optimizer.density()) == (reference.l1_norm(), reference.density())
    restored = FusedPILoTSGD([nn.Parameter(torch.empty(0, 5)), *copy.deepcopy(model).parameters(),
                              nn.Parameter(torch.empty(0))], backend=backend)
    restored.load_state_dict(optimizer.state_dict())
    only_empty = FusedPILoTSGD([nn.Parameter(torch.empty(0, 5))], backend=backend)
    assert only_empty.l1_norm() == 0.0 and math.isnan(only_empty.density())


# ---------------------------------------------------------------- duplicates and parameters that change


def test_parameters_appearing_twice_are_rejected() -> None:
    weight, other = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="twice"):
        FusedPILoTSGD([weight, other, weight])
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        FusedPILoTSGD([{"params": [weight]}, {"params": [weight, other]}])
    optimizer = FusedPILoTSGD([weight])
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [weight]})
    storage = torch.randn(8, 4)
    with pytest.raises(ValueError, match="share memory"):  # two parameters over one tensor's memory
        FusedPILoTSGD([nn.Parameter(storage[:6]), nn.Parameter(storage[4:])])
    before = other.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        optimizer.add_param_group({"params": [other, nn.Parameter(weight.data[1:])]})
    assert len(optimizer.param_groups) == 1 and other not in optimizer.state and torch.equal(other, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_replaced_with_the_same_shape_is_refactorised(backend: str) -> None:
    model = mlp()
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    squared_loss()(model).backward()
    optimizer.step()
    weight = model[0].weight
    new = torch.randn(4, 6)
    new[1:] = weight.detach()[1:]  # only row 0 really changes
    kept_m = optimizer.state[weight]["m"][1:].clone()
    weight.data = new  # another tensor (new address), same shape, dtype and device
    assert optimizer.l1_norm() == pytest.approx(sum(p.detach().abs().sum().item() for p in
                                                    (model[0].weight, model[2].weight)), rel=1e-6)
    state = optimizer.state[weight]
    m0, w0 = factorise(new[0], 1.0)
    assert torch.equal(state["m"][0], m0) and torch.equal(state["w"][0], w0)
    assert torch.equal(state["m"][1:], kept_m)
    assert (state["momentum_buffer_m"][0] == 0).all() and (state["momentum_buffer_m"][1:] != 0).any()
    optimizer.zero_grad()
    squared_loss(2)(model).backward()
    optimizer.step()  # the kernel writes the new tensor
    assert torch.equal(weight.detach(), (state["m"] * state["w"]))


@pytest.mark.parametrize("replacement, match", [
    (lambda w: w.detach().double(), "dtype"),
    (lambda w: torch.randn(5, 6), "shape"),
    (lambda w: w.detach().reshape(6, 4).clone(), "shape"),  # same number of elements
], ids=["dtype", "shape", "same-numel-shape"])  # another device: torch refuses CPU -> meta; CUDA in test_cuda.py
def test_data_replaced_otherwise_is_a_clear_error(replacement, match: str) -> None:
    model = mlp()
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    squared_loss()(model).backward()
    optimizer.step()
    squared_loss(2)(model).backward()
    weight = model[0].weight
    others = [p for p in model.parameters() if p is not weight]
    before = [t.detach().clone() for p in others for t in (p, *optimizer.state[p].values())]
    weight.data = replacement(weight)
    with pytest.raises(ValueError, match=f"changed device, dtype or shape.*{match}|{match}.*create the optimizer"):
        optimizer.step()
    after = [t.detach() for p in others for t in (p, *optimizer.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # the error came before any update


# ---------------------------------------------------------------- state dicts that do not fit


def trained(backend: str = "triton", **options) -> tuple[nn.Module, FusedPILoTSGD]:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **{**OPTIONS, **options})
    optimizer.zero_grad()
    cnn_loss()(model).backward()
    optimizer.step()
    return model, optimizer


def test_foreign_state_dicts_are_rejected_and_leave_the_optimizer_intact() -> None:
    _, source = trained()
    target_model, target = trained()
    before = snapshot(target_model, target)
    state_dict = source.state_dict()

    plain_everywhere = FusedPILoTSGD(SmallCNN().parameters(), reparam=False).state_dict()
    with pytest.raises(ValueError, match="no factors m, w"):
        target.load_state_dict(plain_everywhere)  # a model whose weights this optimizer does not factorise
    other = copy.deepcopy(state_dict)
    other["state"][0]["m"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"m of parameter 0 .*has shape \(2, 2\)"):
        target.load_state_dict(other)
    one_buffer = copy.deepcopy(state_dict)
    del one_buffer["state"][0]["momentum_buffer_w"]
    with pytest.raises(ValueError, match="only one of the momentum buffers"):
        target.load_state_dict(one_buffer)
    for momentum in (0.0, 0.9):  # a dense optimizer's state, with and without momentum buffers
        dense_model = SmallCNN()
        dense = torch.optim.SGD(dense_model.parameters(), lr=0.1, momentum=momentum)
        cnn_loss()(dense_model).backward()
        dense.step()
        with pytest.raises(ValueError, match="dense torch.optim.SGD state dict: load the model's weights"):
            target.load_state_dict(dense.state_dict())
    assert_unchanged(target_model, target, before)


# ---------------------------------------------------------------- int64 sizes and offsets


def test_block_table_of_a_tensor_beyond_int32() -> None:
    """Block indices stay int32; their element offsets (index * BLOCK) do not fit int32 and are int64 in the
    kernel. Only the table is built here (16 MB), no tensor of that size."""
    numel = 2 ** 31 + 5
    table = pilot_kernels.build_block_table([7, numel], torch.device("cpu"))
    blocks = pilot_kernels.telemetry_slots(numel)
    assert table.dtype == torch.int32 and table.shape == (1 + blocks, 2)
    assert table[-1].tolist() == [1, blocks - 1]
    assert (blocks - 1) * pilot_sgd.BLOCK_SIZE < numel <= blocks * pilot_sgd.BLOCK_SIZE
    assert (blocks - 1) * pilot_sgd.BLOCK_SIZE > 2 ** 31 - 1
    with pytest.raises(ValueError, match="do not fit the int32 block table"):
        pilot_kernels.build_block_table([2 ** 32], torch.device("cpu"), block=1)


@pytest.mark.parametrize("factorised", [True, False], ids=["factorised", "plain"])
def test_kernel_offsets_beyond_int32(factorised: bool) -> None:
    """The last block of a tensor of 2**32 + 4 elements, through the interpreter, without allocating it.

    The table's addresses and offsets are shifted back by the block's start, so that start + arange(BLOCK)
    lands on small real buffers: any int32 step in the kernel's offset arithmetic would wrap and miss them,
    reading or writing wild memory. So the kernel runs in a forked child: a crash fails this test, not the run.
    """
    child = multiprocessing.get_context("fork").Process(target=_offsets_beyond_int32, args=(factorised,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0, f"the kernel run failed or crashed (exit code {child.exitcode})"


def _offsets_beyond_int32(factorised: bool) -> None:
    block = 4
    start = 2 ** 32  # block index 2**30 fits the int32 table; the element offset does not fit int32
    grad = torch.randn(block)
    m0, w0 = factorise(torch.randn(block), 1.0)
    initial_x = m0 * w0
    initial_factors = torch.zeros(2 * 32)  # m at offset 0, w at 32 (segments are 32-element aligned)
    initial_factors[:block], initial_factors[32:32 + block] = m0, w0
    flags = pilot_sgd.FLAG_MOMENTUM | (pilot_sgd.FLAG_FACTORISED if factorised else 0)

    def run(shift: int) -> tuple[torch.Tensor, ...]:
        """One step of the block at element offset ``shift``, on fresh copies of the same small buffers."""
        x, factors, momentum = initial_x.clone(), initial_factors.clone(), torch.zeros(2 * 32)
        l1, nnz, started = torch.zeros(1), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int32)
        size = x.element_size()
        row = [x.data_ptr() - shift * size, grad.data_ptr() - shift * size, shift + block, -shift, 32 - shift,
               -shift, 32 - shift, flags, 0, -(shift // block)]
        pilot_sgd.pilot_sgd_kernel[(1,)](
            torch.tensor([row]), torch.tensor([[0.1, 1e-2, 1e-3, 0.9, 1.0]]),
            torch.tensor([[0, shift // block]], dtype=torch.int32), factors, momentum, l1, nnz, started,
            factors, factors, X_DTYPE=pilot_sgd.TORCH_TO_TRITON_DTYPE[torch.float32], BLOCK=block,
            HAS_GRAD_SCALE=False, HAS_FOUND_INF=False)
        return x, factors, momentum, l1, nnz, started

    far, near = run(start), run(0)
    assert all(torch.equal(a, b) for a, b in zip(far, near))
    assert not torch.equal(far[0], initial_x) and far[-1].item() == 1  # the step did run
