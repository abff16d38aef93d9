"""bf16 / fp16 models: fp32 factors and buffers, fp32 math, x = round(m * w) in the parameter's dtype."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from parity import assert_rounded_product, build_pair
from pilot import FusedPILoTSGD, is_factorised
from test_parity import BACKENDS, SmallCNN

LOW_PRECISION = [torch.bfloat16, torch.float16]
OPTIONS = dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3)
TOLERANCE = {torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=2e-4)}
# Low-precision training is chaotic: the rounding of x (and torch.optim.SGD updating the reference's plain
# parameters and their buffers in their own dtype) feeds back through the loss, and the two runs drift apart
# by more than a few ulps after ~10 steps. A few steps compare the step itself.
STEPS = 3


def batch(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=generator).to(dtype), torch.randint(0, 7, (8,), generator=generator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_model_matches_the_reference(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter truncates fp32 -> bf16, a bias that compounds through the loss; "
                    "test_interpreted_bf16_step_equals_the_torch_path checks this case step by step")
    pair = build_pair(SmallCNN().to(dtype), [(None, OPTIONS)], backend=backend)
    x, y = batch(dtype)
    for _ in range(STEPS):
        pair.step(lambda model: nn.functional.cross_entropy(model(x).float(), y))
    for p in pair.fused_model.parameters():
        assert p.dtype == dtype
        assert all(v is None or v.dtype == torch.float32 for v in pair.fused.state[p].values())
    assert_rounded_product(pair.fused, interpreted=backend == "triton")
    pair.assert_close(**TOLERANCE[dtype])


def test_interpreted_bf16_step_equals_the_torch_path() -> None:
    """The same gradients through the interpreted kernel and the eager torch path (itself held to the reference
    above): factorised parameters' fp32 state agrees bit for bit and x within the interpreter's one ulp; plain
    parameters read back their truncated x every step, so they drift by at most one ulp (of the largest value
    they took) per step."""
    base = SmallCNN().bfloat16()
    models = [copy.deepcopy(base) for _ in range(2)]
    optimizers = [FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
                  for model, backend in zip(models, ("triton", "eager"))]
    steps = 10
    largest = [p.detach().float().abs() for p in models[1].parameters()]
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in base.parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            optimizer.step()
        largest = [torch.maximum(a, p.detach().float().abs()) for a, p in zip(largest, models[1].parameters())]
    assert_rounded_product(optimizers[0], interpreted=True)
    for p, q, bound in zip(*(model.parameters() for model in models), largest):
        ours, theirs = optimizers[0].state[p], optimizers[1].state[q]
        if is_factorised(optimizers[0], p):
            assert all(torch.equal(ours[key], theirs[key]) for key in ours)
        else:
            assert ((p.detach().float() - q.detach().float()).abs() <= steps * 2 ** -7 * bound).all()
            torch.testing.assert_close(ours["momentum_buffer"], theirs["momentum_buffer"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_fp32_model_matches_the_reference(backend: str) -> None:
    """bf16 autocast with fp32 parameters: the optimizer sees fp32 gradients, and both sides compute the same."""
    pair = build_pair(SmallCNN(), [(None, OPTIONS)], backend=backend)
    x, y = batch(torch.float32)

    def loss(model: nn.Module) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(model(x).float(), y)

    for _ in range(10):
        pair.step(loss)
    pair.assert_close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_with_grad_scaler(backend: str) -> None:
    """fp16 gradients are unscaled in fp32 on load (GradScaler lets fused optimizers take fp16 gradients)."""
    model = SmallCNN().half()
    unscaled_model = copy.deepcopy(model)
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    unscaled = FusedPILoTSGD(unscaled_model.parameters(), backend=backend, **OPTIONS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6)
    x, y = batch(torch.float16)
    for _ in range(5):
        for m, opt in ((model, optimizer), (unscaled_model, unscaled)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x).float(), y)
            if opt is optimizer:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    assert scaler.get_scale() == 2.0 ** 6  # no step was skipped
    for p, q in zip(model.parameters(), unscaled_model.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float16])  # fp16 gradients underflow less when scaled
    assert_rounded_product(optimizer, interpreted=backend == "triton")
