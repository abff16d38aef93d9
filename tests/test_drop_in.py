"""Drop-in gaps that PyTorch's own generic optimizer tests (TestOptimRenewed) found, each tried as a new user would,
with torch.optim.SGD as the reference for what a drop-in must do."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from parity import build_pair
from pilot import FusedPILoTSGD
from test_parity import BACKENDS, SmallCNN, cnn_loss


def two_layers() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


# ---------------------------------------------------------------- 1. param_names survive load_state_dict


@pytest.mark.parametrize("source_named", [False, True])
def test_load_state_dict_keeps_param_names_like_sgd(source_named: bool) -> None:
    model = two_layers()
    params = model.named_parameters if source_named else model.parameters
    names = [name for name, _ in model.named_parameters()]
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                 lambda ps: FusedPILoTSGD(ps, lr=0.1, momentum=0.9, backend="eager")):
        source, target = make(params()), make(model.named_parameters())
        target.load_state_dict(source.state_dict())
        assert target.state_dict()["param_groups"][0]["param_names"] == names, type(target).__name__


def test_load_state_dict_runs_the_hooks_of_torch_optim() -> None:
    model = two_layers()
    source = FusedPILoTSGD(model.parameters(), lr=0.1, momentum=0.9, backend="eager")
    target = FusedPILoTSGD(model.parameters(), lr=0.2, momentum=0.9, backend="eager")
    calls = []

    def pre_hook(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        calls.append("pre")
        state_dict["param_groups"] = [dict(group, lr=0.3) for group in state_dict["param_groups"]]
        return state_dict

    target.register_load_state_dict_pre_hook(pre_hook)
    target.register_load_state_dict_post_hook(lambda optimizer: calls.append(optimizer.param_groups[0]["lr"]))
    target.load_state_dict(source.state_dict())
    assert calls == ["pre", 0.3]


# ---------------------------------------------------------------- 2. parameters that are not dense in memory


def strided_parameters() -> list[nn.Parameter]:
    """Views with gaps in memory, as nn.Parameter keeps them: 2-D (a factorisable shape) and 1-D; the same values
    at every call."""
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(10, 5, 2)[..., 0]), nn.Parameter(torch.randn(7, 3)[:, 1]),
            nn.Parameter(torch.randn(6, 4).t())]  # dense but transposed: stepped in place


def sgd_steps(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], steps: int = 3,
              scale: float = 1.0) -> None:
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        optimizer.zero_grad()
        for p in params:  # laid out as autograd lays gradients out (the transposed parameter's: transposed)
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator) * scale)
        optimizer.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_plain_parameters_with_gaps_train_like_sgd(backend: str, momentum: float,
                                                    request: pytest.FixtureRequest) -> None:
    """Bit for bit: the torch paths against torch's fused SGD (the kernel they call) on dense copies (torch's
    fused SGD itself steps a tensor with gaps as if it had none), the kernel against torch.optim.SGD with fmas
    rounded once (see test_kernel_rounds_plain_parameters_like_sgd)."""
    options = dict(lr=0.1, momentum=momentum, weight_decay=1e-2)
    params, reference = strided_parameters(), strided_parameters()
    strides = [p.stride() for p in params]
    optimizer = FusedPILoTSGD(params, reparam=False, backend=backend, **options)
    if backend == "triton":
        request.getfixturevalue("fused_multiply_add")
        sgd = torch.optim.SGD(reference, **options)
    else:
        reference = [nn.Parameter(q.detach().contiguous()) for q in reference]
        sgd = torch.optim.SGD(reference, fused=True, **options)
    sgd_steps(optimizer, params)
    sgd_steps(sgd, reference)
    for p, q, stride in zip(params, reference, strides):
        assert p.stride() == stride  # still the user's tensor, gaps included
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        if momentum:
            torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"],
                                       rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_factorised_parameters_with_gaps_train_like_dense_ones(backend: str) -> None:
    """Factorised views with gaps (every parameter factorised, as reparam=True does) step in a dense copy, as plain
    ones do: bit for bit what the same values as dense parameters get, factors, buffers and telemetry included;
    the parameters stay the user's tensors, and a value written into one from outside is factorised again."""
    params, dense = strided_parameters(), [nn.Parameter(p.detach().contiguous()) for p in strided_parameters()]
    strides = [p.stride() for p in params]
    optimizers = [FusedPILoTSGD(ps, reparam=True, backend=backend, lr=0.1, momentum=0.9, alpha=1e-2)
                  for ps in (params, dense)]
    for step in range(4):
        if step == 2:  # written outside the optimizer: factorised again, through the stage
            for ps in (params, dense):
                with torch.no_grad():
                    ps[0][0].fill_(0.5)
        for optimizer, ps in zip(optimizers, (params, dense)):
            sgd_steps(optimizer, ps, steps=1)
    assert [p.stride() for p in params] == strides
    for p, q in zip(params, dense):
        assert torch.equal(p, q)
        for key, value in optimizers[0].state[p].items():
            assert torch.equal(value, optimizers[1].state[q][key]), key
    assert optimizers[0].density() == optimizers[1].density()  # l1: the transposed one sums in another order
    assert optimizers[0].l1_norm() == pytest.approx(optimizers[1].l1_norm(), rel=1e-6)


# ---------------------------------------------------------------- 3. GradScaler leaves .grad unscaled


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scaler_step_leaves_the_gradients_unscaled_like_fused_sgd(backend: str, dtype: torch.dtype) -> None:
    """Every kind of parameter: factorised, plain, plain with gaps (stepped in a stage), and a transposed gradient
    (read through a copy); the reference is torch's fused SGD, which unscales .grad in place."""
    def model() -> list[nn.Parameter]:
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(6, 5, dtype=dtype)), nn.Parameter(torch.randn(7, dtype=dtype)),
                nn.Parameter(torch.randn(7, 3, dtype=dtype)[:, 1]), nn.Parameter(torch.randn(4, 6, dtype=dtype))]

    def scaled_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
        torch.manual_seed(1)
        grads = [torch.randn(p.shape, dtype=dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = (g * 1024).clone()
        params[3].grad = (grads[3] * 1024).t().contiguous().t()  # another memory layout than the parameter
        return grads

    options = dict(lr=0.1, momentum=0.9)
    params, reference = model(), model()
    optimizer = FusedPILoTSGD(params, backend=backend, **options)
    sgd = torch.optim.SGD(reference, fused=True, **options) if dtype == torch.float32 else None
    for optim, ps in ((optimizer, params), (sgd, reference)):
        if optim is None:  # torch's fused SGD on CPU wants fp32 parameters
            continue
        grads = scaled_grads(ps)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(torch.ones(()))  # as scaling the loss would: the scaler now has its scale
        with pytest.warns(RuntimeWarning, match="memory layout") if optim is optimizer else contextlib.nullcontext():
            scaler.step(optim)  # the transposed gradient: copied, with a warning
        for index, (p, g) in enumerate(zip(ps, grads)):
            assert torch.equal(p.grad, g), (type(optim).__name__, index)  # 1024 is a power of two: exact


# ---------------------------------------------------------------- 5. plain parameters rounded as torch.optim.SGD does


@pytest.fixture
def fused_multiply_add(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's interpreter with tl.fma rounded once, as compiled kernels and torch's CPU and CUDA kernels do.

    The interpreter evaluates tl.fma(x, y, z) as x * y + z in numpy, rounding the product and the sum. Here the
    product of two fp32 values is exact in fp64 and only the sum is rounded (to fp64 and then fp32: a double
    rounding that differs from a true fma on far fewer than one element in 2**20, none in these tests)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    plain_fma = builder.create_fma

    def fma(x, y, z):  # noqa: ANN001, ANN202 - the builder's signature
        if z.data.dtype != np.float32:
            return plain_fma(x, y, z)
        exact = x.data.astype(np.float64) * y.data.astype(np.float64) + z.data.astype(np.float64)
        return interpreter.TensorHandle(exact.astype(np.float32), z.dtype.scalar)

    monkeypatch.setattr(builder, "create_fma", fma)


SGD_OPTIONS = [dict(lr=0.1, momentum=0.9, weight_decay=1e-2), dict(lr=0.1, momentum=0.9, nesterov=True),
               dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=1e-3, maximize=True),
               dict(lr=0.1, weight_decay=1e-2)]


@pytest.mark.parametrize("options", SGD_OPTIONS)
def test_kernel_rounds_plain_parameters_like_sgd(fused_multiply_add: None, options: dict) -> None:
    """The kernel's multiply-adds are fmas in torch.optim.SGD's order: with fmas rounded once (as on a GPU), the
    interpreted kernel equals torch.optim.SGD (CPU, fma in its add(alpha=)) bit for bit, buffers included."""
    params, reference = strided_parameters(), strided_parameters()
    params = [nn.Parameter(p.detach().contiguous()) for p in params] + params  # dense ones in the kernel too
    reference = [nn.Parameter(p.detach().contiguous()) for p in reference] + reference
    optimizer = FusedPILoTSGD(params, reparam=False, backend="triton", **options)
    sgd = torch.optim.SGD(reference, **options)
    sgd_steps(optimizer, params)
    sgd_steps(sgd, reference)
    for p, q in zip(params, reference):
        assert torch.equal(p, q)
        if options.get("momentum"):
            assert torch.equal(optimizer.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])


@pytest.mark.parametrize("options", [dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3),
                                     dict(lr=0.05, momentum=0.5, dampening=0.3, nesterov=False, alpha=5e-3)])
def test_kernel_rounds_factors_like_sgd_on_the_factors(fused_multiply_add: None, options: dict) -> None:
    """The same for factorised parameters against the eager reference (torch.optim.SGD on m and w)."""
    pair = build_pair(SmallCNN(), [(None, options)], backend="triton")
    for seed in range(3):
        pair.step(cnn_loss(seed))
    pair.assert_close(rtol=0, atol=0)


# ---------------------------------------------------------------- 6. autograd sees the step's writes


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_stepped_after_being_saved_for_backward_is_caught_like_sgd(backend: str) -> None:
    """torch.optim's in-place updates bump the parameters' version counters, so a backward through a graph that
    saved a parameter before the step raises instead of using the new value; the kernel writes through raw pointers
    and bumps them by hand. A factorised weight, a plain bias and a plain parameter with gaps (stepped in a copy)."""
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.1),
                 lambda ps: FusedPILoTSGD(ps, lr=0.1, alpha=1e-2, backend=backend)):
        params = [nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3, 2)[:, 0])]
        optimizer = make(params)
        for index, p in enumerate(params):
            loss = (p * p).sum()  # p saved for backward
            for q in params:
                q.grad = torch.ones_like(q) if q is p else None
            optimizer.step()
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()


# ---------------------------------------------------------------- 4. foreach= and fused=, as users pass them to SGD


@pytest.mark.parametrize("kwargs", [dict(foreach=False), dict(foreach=True), dict(fused=True), dict(fused=False),
                                    dict(foreach=None, fused=None)])
def test_foreach_and_fused_are_accepted_and_change_nothing(kwargs: dict) -> None:
    model = two_layers()
    params = [p for p in model.parameters()]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    optimizer = FusedPILoTSGD(params, lr=0.1, momentum=0.9, alpha=1e-2, backend="eager", **kwargs)
    plain = FusedPILoTSGD(twins, lr=0.1, momentum=0.9, alpha=1e-2, backend="eager")
    sgd_steps(optimizer, params)
    sgd_steps(plain, twins)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    assert "foreach" not in optimizer.param_groups[0] and "fused" not in optimizer.param_groups[0]


@pytest.mark.parametrize("name", ["foreach", "fused"])
def test_foreach_and_fused_must_be_bools(name: str) -> None:
    with pytest.raises(TypeError, match=f"Invalid {name} value: expected None or a bool"):
        FusedPILoTSGD(two_layers().parameters(), **{name: "yes"})
