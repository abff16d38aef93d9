"""``torch.compile`` without dynamo's per-call cost for arguments it has already seen: :class:`DirectCompiled`.

A call through dynamo costs about 50 us on the host (frame handling, guards over every argument, config contexts),
whatever the work; for a function called once per large tensor per optimizer step that is 2 ms of ResNet-50's
25 ms CPU step. :class:`DirectCompiled` lets dynamo handle the first call for each *argument key* (every tensor's
type, dtype, size, stride, storage offset, device and requires_grad; the other arguments' values; the thread
count) and records which compiled graph served it. Later calls with the same key, under the same global state
(dynamo's own ``GlobalStateGuard``: grad mode, autocast, deterministic algorithms and the like), call that graph
directly: about 10 us. A key holds everything dynamo's guards can check for such arguments, so a graph that served
a key once would serve it again; anything else (a new size, a new dtype, a changed global state) goes through
dynamo, which checks its guards and compiles where needed.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Callable, ContextManager, NamedTuple, Optional

import torch
import torch._dynamo.source as dynamo_source
from torch import Tensor
from torch._C._dynamo.guards import GlobalStateGuard
from torch._inductor.compile_fx import compile_fx


class Served(NamedTuple):
    """A compiled graph and where each of its arguments comes from: ``(name, what, index)`` with what one of
    "value", "size", "stride", "offset" (None where a graph argument comes from anything else: such a graph is only
    called through dynamo)."""

    function: Callable[..., Any]
    sources: Optional[tuple[tuple[str, str, int], ...]]


class Direct(NamedTuple):
    """A key's graph, how to build its arguments, and the global state under which dynamo chose it."""

    function: Callable[..., Any]
    getters: tuple[Callable[[tuple[Any, ...]], Any], ...]
    state: GlobalStateGuard


class DirectCompiled:
    """``function`` compiled by ``torch.compile(function, **options)`` with inductor, called directly for argument
    keys dynamo has seen (see the module docstring). For functions that work in place and return None (dynamo
    rebuilds a function's result from its graph's outputs; a direct call does not); positional arguments only.
    ``around`` makes the context entered around the calls that go through dynamo (config patches, for example).

    ``MAX_KEYS`` bounds the keys kept (all are dropped when it is reached: the next calls go through dynamo again).
    """

    MAX_KEYS = 1024

    def __init__(self, function: Callable[..., Any], around: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                 **options: Any) -> None:
        self.around = around
        self.parameters = list(inspect.signature(function).parameters)
        self.compiled = torch.compile(function, backend=_recording_inductor, **options)
        self.direct: dict[tuple[Any, ...], Direct] = {}

    def __call__(self, *args: Any) -> None:
        key = argument_key(args)
        direct = self.direct.get(key) if key is not None else None
        if direct is not None and direct.state.check():
            direct.function(*(get(args) for get in direct.getters))
            return
        _last.served = None
        with self.around():
            result = self.compiled(*args)
        if result is not None:
            raise TypeError(f"DirectCompiled is for functions that return None; this one returned {type(result)}")
        served, _last.served = _last.served, None
        if key is not None and served is not None and served.sources is not None:
            getters = tuple(self._getter(*source) for source in served.sources)
            if all(getter is not None for getter in getters):
                if len(self.direct) >= self.MAX_KEYS:
                    self.direct.clear()
                self.direct[key] = Direct(served.function, getters, GlobalStateGuard())

    def _getter(self, name: str, what: str, index: int) -> Optional[Callable[[tuple[Any, ...]], Any]]:
        """How to get one graph argument from the function's positional arguments."""
        if name not in self.parameters:
            return None
        i = self.parameters.index(name)
        if what == "value":
            return lambda args: args[i]
        if what == "size":
            return lambda args: args[i].size(index)
        if what == "stride":
            return lambda args: args[i].stride(index)
        return lambda args: args[i].storage_offset()


# Which graph served this thread's last call. One backend object for every DirectCompiled: dynamo keeps compiled
# graphs per function and backend, so instances of the same function share them as with backend="inductor".
_last = threading.local()


def _recording_inductor(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Inductor, with a note of which graph served each call."""
    sources = _sources(graph)  # before compiling: dynamo drops the arguments' sources afterwards
    served = Served(compile_fx(graph, example_inputs), sources)

    def run(*args: Any) -> Any:
        _last.served = served
        return served.function(*args)

    return run


def argument_key(args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
    """What dynamo's guards can check of ``args`` (tensors, None, bools, ints, floats), with the thread count; None
    for an argument of any other kind (such calls always go through dynamo)."""
    key: list[Any] = [torch.get_num_threads()]
    for a in args:
        if isinstance(a, Tensor):
            key.append((type(a), a.dtype, a.shape, a.stride(), a.storage_offset(), a.device, a.requires_grad))
        elif a is None or isinstance(a, (bool, int, float)):
            key.append((type(a), a))
        else:
            return None
    return tuple(key)


_PROPERTIES = {dynamo_source.TensorProperty.SIZE: "size", dynamo_source.TensorProperty.STRIDE: "stride",
               dynamo_source.TensorProperty.STORAGE_OFFSET: "offset"}


def _sources(graph: torch.fx.GraphModule) -> Optional[tuple[tuple[str, str, int], ...]]:
    """Where each placeholder of dynamo's graph comes from (see :class:`Served`), or None if one comes from
    anything but a local (an argument), or a size, stride or storage offset of one."""
    sources = []
    for node in graph.graph.nodes:
        if node.op != "placeholder":
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        if isinstance(source, dynamo_source.LocalSource):
            sources.append((source.local_name, "value", 0))
        elif (isinstance(source, dynamo_source.TensorPropertySource) and source.prop in _PROPERTIES
              and isinstance(source.base, dynamo_source.LocalSource)):
            sources.append((source.base.local_name, _PROPERTIES[source.prop], source.idx or 0))
        else:
            return None
    return tuple(sources)
