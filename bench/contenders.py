"""The contenders: one model trained by dense SGD, by the eager m*w reference, and by FusedPILoTSGD.

Every contender starts from a deep copy of the same freshly built model (same seed) and gets the same
hyper-parameters, so the only difference between them is how the step is computed:

* ``dense-foreach``, ``dense-fused``: the dense model with ``torch.optim.SGD(foreach=True)`` / ``(fused=True)``;
* ``reference-foreach``, ``reference-fused``: the model parametrised as x = m * w by :mod:`pilot.reference`,
  trained by ``torch.optim.SGD`` on the factors (``weight_decay=alpha`` there), with either implementation;
* ``pilot``: the dense model with :class:`pilot.FusedPILoTSGD` (the Triton kernel on CUDA, the
  ``torch.compile`` path on CPU).

The reference's optimizer step alone is not what pilot's step replaces: SGD on the two factors already moves the
same 40 B per factorised element as pilot's step. The reference's extra cost over dense training is the product
work around its step, x = m * w in every forward and g * w, g * m in every backward; pilot's step does that work
inside its one pass. :func:`reference_step_with_products` is the reference's step together with that work.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from pilot import FusedPILoTSGD
from pilot.models import build_model
from pilot.reference import factor_pairs, parametrize_model, reference_param_groups

CONTENDERS = ("dense-foreach", "dense-fused", "reference-foreach", "reference-fused", "pilot")
BASELINE = "dense-fused"  # every ratio is taken to torch's fastest dense step
REFERENCES = ("reference-foreach", "reference-fused")
PRODUCTS = " + products"  # suffix of a reference's step timed together with its product work


def with_products(reference: str) -> str:
    """The name under which ``reference``'s step is timed with its product work."""
    return reference + PRODUCTS


# Section 1 (the optimizer step alone) also times each reference's step with its product work, listed after it.
STEP_CONTENDERS = tuple(n for name in CONTENDERS for n in ((name, with_products(name)) if name in REFERENCES
                                                              else (name,)))

# The ImageNet ResNets are torchvision's (1000 classes, 224x224); the others are the CIFAR / MNIST models.
IMAGENET_MODELS = ("resnet18", "resnet50")
GRAD_SCALE = 1e-4  # random gradients of a realistic size: thousands of steps neither overflow nor reach denormals


@dataclass(frozen=True)
class Hyper:
    """The paper's CIFAR settings (SGD momentum 0.9, beta = 1, alpha in {1e-4, 3e-4, 1e-3})."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    alpha: float = 1e-4
    beta: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_classes: int
    in_channels: int
    image_size: int

    def build(self) -> nn.Module:
        return build_model(self.name, self.num_classes, self.in_channels, self.image_size)

    def batch(self, batch_size: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A random input batch and labels (the step's cost does not depend on the values)."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, self.in_channels, self.image_size, self.image_size, generator=generator)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return x.to(device), y.to(device)


def model_spec(name: str) -> ModelSpec:
    if name in IMAGENET_MODELS:
        return ModelSpec(name, 1000, 3, 224)
    if name == "lenet300-100":
        return ModelSpec(name, 10, 1, 28)
    return ModelSpec(name, 10, 3, 32)


@dataclass
class Contender:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def trained(self) -> list[Tensor]:
        """The tensors the optimizer updates from their .grad (the factors m, w for the reference)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def fill_random_grads(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for p in self.trained:
            p.grad = (torch.randn(p.shape, generator=generator) * GRAD_SCALE).to(p.device)

    def training_step(self, x: Tensor, y: Tensor) -> Callable[[], None]:
        """One training step on (x, y): zero_grad (set to None), forward, cross-entropy, backward, step."""
        model, optimizer = self.model, self.optimizer

        def step() -> None:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        return step


def reference_step_with_products(contender: Contender, seed: int) -> Callable[[], None]:
    """The eager reference's share of a training step that pilot's step replaces, from a fixed gradient g of x.

    Each call recomputes x = m * w for every factorised weight (the forward's product), back-propagates a fixed
    random g (scaled like :meth:`Contender.fill_random_grads`) through it into fresh ``m.grad``, ``w.grad`` (the
    backward's products g * w, g * m), then steps the optimizer. Gradients of the other parameters stay as
    :meth:`Contender.fill_random_grads` left them.
    """
    model, optimizer = contender.model, contender.optimizer
    pairs = factor_pairs(model)
    if not pairs:
        raise ValueError(f"{contender.name} has no factorised weights; reference_step_with_products needs one of "
                         f"{', '.join(REFERENCES)}")
    weights = [operator.attrgetter(name) for name in pairs]
    generator = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(x.shape, generator=generator) * GRAD_SCALE).to(x.device, x.dtype)
             for x in (get(model) for get in weights)]
    factors = [t for pair in pairs.values() for t in pair]

    def step() -> None:
        for factor in factors:
            factor.grad = None  # as zero_grad leaves them before a backward
        torch.autograd.backward([get(model) for get in weights], grads)
        optimizer.step()

    return step


def pilot_backend(device: torch.device) -> str:
    """The backend FusedPILoTSGD uses for a real step: the Triton kernel on CUDA, torch.compile on CPU.

    Named explicitly so that TRITON_INTERPRET (which makes "auto" pick the interpreter on CPU) never
    ends up being timed.
    """
    return "triton" if device.type == "cuda" else "compile"


def build_contender(name: str, template: nn.Module, hyper: Hyper, device: torch.device, *,
                    pilot_backend_name: str | None = None) -> Contender:
    """``name`` (one of CONTENDERS) on a deep copy of ``template``, moved to ``device``.

    ``pilot_backend_name`` overrides :func:`pilot_backend` (the traffic count runs the kernel interpreted).
    """
    model = copy.deepcopy(template).to(device).train()
    sgd = dict(lr=hyper.lr, momentum=hyper.momentum)
    if name.startswith("dense-"):
        implementation = {"foreach": True} if name == "dense-foreach" else {"fused": True}
        optimizer = torch.optim.SGD(model.parameters(), weight_decay=hyper.weight_decay, **sgd, **implementation)
    elif name in REFERENCES:
        parametrize_model(model, beta=hyper.beta)
        implementation = {"foreach": True} if name == "reference-foreach" else {"fused": True}
        optimizer = torch.optim.SGD(
            reference_param_groups(model, alpha=hyper.alpha, weight_decay=hyper.weight_decay), **sgd, **implementation)
    elif name == "pilot":
        optimizer = FusedPILoTSGD(model.parameters(), weight_decay=hyper.weight_decay, alpha=hyper.alpha,
                                  beta=hyper.beta, backend=pilot_backend_name or pilot_backend(device), **sgd)
    else:
        raise ValueError(f"unknown contender {name!r}; valid names: {', '.join(CONTENDERS)}")
    return Contender(name, model, optimizer)


def build_template(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """The model every contender copies, freshly initialised from ``seed``."""
    torch.manual_seed(seed)
    return spec.build()


def build_contenders(spec: ModelSpec, hyper: Hyper, device: torch.device, names: Sequence[str] = CONTENDERS, *,
                     seed: int = 0, pilot_backend_name: str | None = None) -> dict[str, Contender]:
    """The named contenders on copies of one model built with ``seed``."""
    template = build_template(spec, seed)
    return {name: build_contender(name, template, hyper, device, pilot_backend_name=pilot_backend_name)
            for name in names}


def parameter_count(model: nn.Module) -> int:
    """Elements of a dense model's parameters (the denominator of every bytes-per-parameter figure)."""
    return sum(p.numel() for p in model.parameters())
