r"""Inference with the zeros of a pruned model skipped: :func:`sparse_inference` swaps Linear and Conv2d layers for
sparse matrix products (``torch.sparse`` CSR) where that is faster, and keeps the others dense.

- :class:`SparseLinear`: :math:`y = W x + b` with W in CSR; a single example is a matrix-vector product.
- :class:`SparseConv2d`: the convolution as :math:`W_{(O, C k_h k_w)} \cdot \mathrm{unfold}(x)`, W in CSR. The
  unfolded input is :math:`k_h k_w` times the input's size, so this costs memory and time that a dense
  convolution (oneDNN on CPU) does not spend; it pays only at very low density.

Each sparse layer reads only its non-zeros (values, column indices, row pointers: 4 + 4 bytes per non-zero in
fp32 with int32 indices, against 4 bytes per entry dense), so it moves less than the dense layer below about 50%
density; whether it is also faster depends on the CPU, the batch and torch's per-call overhead (several
microseconds per call, as much as a small layer's product at batch 1), which is why a layer is chosen by
measurement when an example input is given.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sparse_inference", "SparseInferenceModel", "SparseLinear", "SparseConv2d", "LayerChoice",
           "MAX_DENSITY", "MIN_ENTRIES"]

# The density rule used without an example input: a Linear layer runs sparse when at most MAX_DENSITY of its
# weights are non-zero and it has at least MIN_ENTRIES of them. Measured on a 2-core AMD EPYC: LeNet-300-100's
# first layer (235,200 weights) was faster in CSR at 1-2% density at batch 1 and 256; its second (30,000) lost at
# batch 1 even at 3%, torch's fixed cost per sparse call being larger than the whole dense product. Convolutions
# stay dense under the rule: unfold + CSR lost in every ResNet-20 layer at 2-5% density, batch 1 and 64.
MAX_DENSITY = 0.05
MIN_ENTRIES = 1 << 16
SAMPLE_SECONDS = 2e-3  # one timing sample of a layer: back-to-back calls for at least this long
# Interleaved samples per layer and contender. The fastest sample of each is compared: on a shared machine the
# others are the same cost plus time lost to other processes.
ROUNDS = 7
# The sparse form is kept only when its fastest sample takes at most this fraction of the dense layer's: closer
# calls flip from run to run on a loaded CPU, and a dense layer never costs more than it did.
MARGIN = 0.9

Layer = Union[nn.Linear, nn.Conv2d]


def _csr(weight: Tensor) -> Tensor:
    """``weight`` as a CSR matrix (out x the rest), with int32 indices where they fit.

    torch's CPU CSR products call MKL, which takes 32-bit indices: with torch's default int64 both index arrays
    are converted on every call (an ``aten::_to_copy`` in the profile; a third of a batch-1 product's time).
    """
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": true, and nothing a user can act on
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        matrix = weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()
        if max(matrix.shape[1], matrix.values().numel()) >= 2**31:
            return matrix
        # The indices are torch's own, narrowed: valid, so not checked again (which would say so in a warning).
        return torch.sparse_csr_tensor(matrix.crow_indices().to(torch.int32), matrix.col_indices().to(torch.int32),
                                       matrix.values(), matrix.shape, check_invariants=False)


class _CsrLayer(nn.Module):
    """The buffers of a sparse layer: ``weight`` (CSR, out x the rest of the dense weight's dimensions) and ``bias``.

    Not in the state dict (the dense model's state dict is what checkpoints hold). Deep copies clone the buffers by
    hand: torch cannot deep-copy a CSR tensor (it has no single storage to copy).
    """

    def __init__(self, layer: Layer) -> None:
        super().__init__()
        self.register_buffer("weight", _csr(layer.weight), persistent=False)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone(), persistent=False)

    def __deepcopy__(self, memo: dict[int, object]) -> "_CsrLayer":
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "_buffers"}, memo))
        copied._buffers = {name: None if t is None else t.clone() for name, t in self._buffers.items()}
        return copied


class SparseLinear(_CsrLayer):
    """A Linear layer whose weight is kept in CSR: same inputs and outputs as ``linear``, for inference."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        # At batch 1 the product takes about 6 us on a 2-core EPYC and nn.Module's attribute fallback about 1 us
        # per buffer read: the buffers are read from their dict.
        weight, bias = self._buffers["weight"], self._buffers["bias"]
        if x.shape[0] == 1:  # matrix-vector: torch's cheapest sparse call, the bias added in the same op
            vector = x.view(-1)
            return (torch.mv(weight, vector) if bias is None else torch.addmv(bias, weight, vector)).view(1, -1)
        # W @ x^T, handed back transposed (a view): no copy
        return (torch.mm(weight, x.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x.t())).t()


def _conv_unsupported(conv: nn.Conv2d) -> Optional[str]:
    """Why :class:`SparseConv2d` cannot compute ``conv``; None if it can."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return (f"needs groups=1, padding_mode='zeros' and numeric padding, got groups={conv.groups}, "
                f"padding_mode={conv.padding_mode!r}, padding={conv.padding!r}")
    return None


class SparseConv2d(_CsrLayer):
    """A Conv2d (groups 1, zero padding given as numbers) computed as CSR weight times the unfolded input."""

    def __init__(self, conv: nn.Conv2d) -> None:
        unsupported = _conv_unsupported(conv)
        if unsupported:
            raise ValueError(f"SparseConv2d {unsupported}")
        super().__init__(conv)
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation

    def forward(self, x: Tensor) -> Tensor:
        n, _, height, width = x.shape
        out_h, out_w = (
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip((height, width), self.padding, self.dilation,
                                                           self.kernel_size, self.stride))
        columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (n, C k k, L)
        if n == 1:
            y = torch.mm(self.weight, columns[0]).unsqueeze(0)
        else:  # one product for the whole batch: (C k k, n L) in, (O, n L) out, back to (n, O, L) as a view
            y = torch.mm(self.weight, columns.transpose(0, 1).reshape(columns.shape[1], -1))
            y = y.view(self.out_channels, n, -1).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.reshape(n, self.out_channels, out_h, out_w)


@dataclass(frozen=True)
class LayerChoice:
    """How :func:`sparse_inference` runs one Linear or Conv2d layer, and why."""

    name: str
    kind: str  # "linear" or "conv2d"
    entries: int
    density: float
    sparse: bool
    reason: str  # "measured", "density rule", or why the sparse form could not be used
    dense_us: Optional[float] = None  # time of the layer on the example input (fastest sample), if measured
    sparse_us: Optional[float] = None


class SparseInferenceModel(nn.Module):
    """What :func:`sparse_inference` returns: ``model`` (a copy, in eval mode, sparse layers swapped in) called as
    the original, and ``choices``, one :class:`LayerChoice` per Linear / Conv2d layer; ``table()`` prints them."""

    def __init__(self, model: nn.Module, choices: tuple[LayerChoice, ...]) -> None:
        super().__init__()
        self.model = model
        self.choices = choices

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.model(*args, **kwargs)

    def table(self) -> str:
        width = max([len("layer")] + [len(c.name) for c in self.choices])
        lines = [f"{'layer':<{width}}  {'kind':<6}  {'entries':>9}  {'density':>7}  {'runs':<6}  {'dense us':>8}  "
                 f"{'sparse us':>9}  why"]
        for c in self.choices:
            times = "".join(f"  {'-' if us is None else f'{us:.1f}':>{w}}" for us, w in ((c.dense_us, 8),
                                                                                        (c.sparse_us, 9)))
            lines.append(f"{c.name:<{width}}  {c.kind:<6}  {c.entries:>9,}  {c.density:>7.2%}  "
                         f"{'sparse' if c.sparse else 'dense':<6}{times}  {c.reason}")
        return "\n".join(lines)


def _sparse_form(layer: nn.Module) -> Optional[Callable[[], nn.Module]]:
    if isinstance(layer, nn.Linear):
        return lambda: SparseLinear(layer)
    if isinstance(layer, nn.Conv2d) and _conv_unsupported(layer) is None:
        return lambda: SparseConv2d(layer)
    return None


def _fastest_us(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Microseconds per call of each callable in its fastest of :data:`ROUNDS` samples, taken in alternation."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # first call: allocations and lazy initialisation, not timed
    for _ in range(ROUNDS):
        for name, call in calls.items():
            count, start = 0, time.perf_counter()
            while count == 0 or time.perf_counter() - start < SAMPLE_SECONDS:
                call()
                count += 1
            samples[name].append((time.perf_counter() - start) / count * 1e6)
    return {name: min(values) for name, values in samples.items()}


def _layer_inputs(model: nn.Module, names: list[str], example_input: object) -> dict[str, Tensor]:
    """The input each named layer receives when ``model`` runs on ``example_input`` (its first call)."""
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0])) for name in names]
    try:
        model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def sparse_inference(model: nn.Module, example_input: object = None, *, max_density: float = MAX_DENSITY,
                     min_entries: int = MIN_ENTRIES) -> SparseInferenceModel:
    """A copy of ``model`` for inference (eval mode, under ``torch.inference_mode()`` or ``no_grad``) whose pruned
    Linear and Conv2d layers run as CSR products where that is faster; ``model`` itself is not changed.

    How a layer is chosen, per layer (``choices`` of the result says which and why):

    - with ``example_input`` (a tensor, or a tuple of positional arguments, shaped as in use: the batch size
      matters): by measurement. The model runs once on it to record each layer's input; then the dense layer and
      its sparse form are timed on that input, alternating, :data:`ROUNDS` samples each, and the sparse form is
      kept when its fastest sample is at least 10% faster than the dense layer's (:data:`MARGIN`). Takes about
      30 ms per layer.
    - without: the density rule of :data:`MAX_DENSITY` / :data:`MIN_ENTRIES` (see there): a Linear layer with at
      least ``min_entries`` weights of which at most ``max_density`` are non-zero runs sparse; convolutions stay
      dense.

    A layer whose sparse form torch cannot run (for example bf16 on CPU, for which torch.sparse has no CSR
    kernel) stays dense, with torch's message as the reason. Grouped convolutions and Conv1d / Conv3d stay as
    they are and are not listed.
    """
    if not 0 <= max_density <= 1:
        raise ValueError(f"Invalid max_density value: {max_density!r} (need a fraction in [0, 1])")
    copied = copy.deepcopy(model).eval()
    layers = {name: layer for name, layer in copied.named_modules() if _sparse_form(layer) is not None}
    inputs = None if example_input is None else _layer_inputs(copied, list(layers), example_input)
    choices = []
    for name, layer in layers.items():
        weight = layer.weight.detach()
        kind = "linear" if isinstance(layer, nn.Linear) else "conv2d"
        density = float((weight != 0).sum()) / weight.numel()
        sparse_layer = _sparse_form(layer)()
        probe = inputs.get(name) if inputs is not None else None
        try:
            sparse_layer(probe if probe is not None else weight.new_zeros(1, *_input_shape(layer)))
        except (RuntimeError, NotImplementedError) as error:  # torch's "not implemented for <dtype>"
            choices.append(LayerChoice(name, kind, weight.numel(), density, False,
                                       f"sparse form failed: {str(error).splitlines()[0]}"))
            continue
        if probe is not None:
            times = _fastest_us({"dense": lambda: layer(probe), "sparse": lambda: sparse_layer(probe)})
            use = times["sparse"] <= MARGIN * times["dense"]
            choice = LayerChoice(name, kind, weight.numel(), density, use, "measured", times["dense"], times["sparse"])
        else:
            use = kind == "linear" and density <= max_density and weight.numel() >= min_entries
            reason = "density rule" + (" (the example input did not reach it)" if inputs is not None else "")
            choice = LayerChoice(name, kind, weight.numel(), density, use, reason)
        if use:
            parent, _, attribute = name.rpartition(".")
            setattr(copied.get_submodule(parent), attribute, sparse_layer)
        choices.append(choice)
    return SparseInferenceModel(copied, tuple(choices)).eval()


def _input_shape(layer: Layer) -> tuple[int, ...]:
    """The shape of one example's input that ``layer`` accepts, for probing its sparse form."""
    if isinstance(layer, nn.Linear):
        return (layer.in_features,)
    span = [dilation * (kernel - 1) + 1 for dilation, kernel in zip(layer.dilation, layer.kernel_size)]
    return (layer.in_channels, *span)
