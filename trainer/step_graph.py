"""`train.cuda_graph`: the optimizer step's device-only parts captured once as CUDA graphs, then replayed.

trainer/loop.py splits a step into two parts that take tensors in and give tensors out, with no host read
and no host decision inside:
  forward_backward  save the buffers; each micro-batch's forward, losses and backward; the finite check
                    and the stop flags (one all-reduce); the grad norms (clipped); the skip flag
  update            both models' fused Adam masked by the skip flag; the buffers put back where skipped
Between them the host reads the previous step (train.sync_free: its EMA must run before this step's
update changes the weights) and writes the LR into the optimizer's LR tensor. Around them it copies the
batches, the noise and its two flags into the parts' static inputs, and reads the numbers back.

A replay launches the whole part with one call instead of one Python-dispatched kernel at a time, so the
host no longer limits a small-batch step. The Python inside a part runs only while it is captured: a
part may depend on Python state only through its inputs or through state that stays fixed while the
graph lives (the model, the optimizer's hyper-parameters but the LR). The one such state that changes
during a run, whether the discriminators train (adv.start), is the capture's key: a new key captures anew.

Lifecycle per key: WARMUP steps run eagerly on the capture stream (cuDNN autotuning, cuBLAS handles on
that stream, torch.compile); the next step captures both parts into graphs that share one memory pool, and
replays them; every later step only replays. Outputs are the same tensors at every replay, overwritten:
what the host needs is copied out before the next replay (loop._queue_step does).

On CPU there is no capture: the parts run eagerly over the same static inputs and copy their results
into the same output tensors, so the CPU tests exercise the plumbing (and the check that a part holds no
host read), not the replay itself.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Eager steps before a capture (PyTorch's documented pattern warms up a few iterations on a side stream).
WARMUP = 3
_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

Part = Callable[[list[torch.Tensor]], tuple[tuple[torch.Tensor, ...], object]]


class _NoHostRead(TorchDispatchMode):
    """Raise on an operation that reads a tensor's value on the host (`.item()`, `float(t)`, `bool(t)`, an
    `if` on a tensor): a CUDA graph cannot hold one (its capture fails on a GPU), so the CPU stand-in
    refuses it too. (`.tolist()` and copies to the CPU are no-ops on CPU tensors and go unseen here.)"""

    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            raise RuntimeError(f"train.cuda_graph: the step's {self.part} part reads a tensor on the host "
                               f"({func}); a CUDA graph cannot capture that")
        return func(*args, **(kwargs or {}))


class _Captured:
    """One part: its static inputs, its output tensors and (on CUDA) its graph."""

    def __init__(self, inputs: list[torch.Tensor], outputs: tuple[torch.Tensor, ...], aux, graph):
        self.inputs, self.outputs, self.aux, self.graph = inputs, outputs, aux, graph


class StepGraph:
    """Runs the step's parts: eagerly while warming up, then captured and replayed (see the module doc).

    Per step: `begin(key)`, then `run(name, fn, inputs)` for each part in the same order every step, then
    `end()`. `fn(inputs)` returns (tensors, aux): the tensors become the part's outputs, `aux` (Python
    values, e.g. the loss terms' names) is kept from the run that captured it."""

    def __init__(self, device: torch.device, warmup: int = WARMUP):
        self.device, self.warmup = torch.device(device), warmup
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None  # warm-up and capture stream
        self.key: object = None
        self.warm = 0  # eager steps run under the current key
        self.parts: dict[str, _Captured] = {}  # filled by the capturing step: empty until the key is captured
        self.phase = "warmup"
        self.captures = 0  # steps that captured (a test reads it)

    def begin(self, key) -> None:
        if key != self.key:  # the step's structure changed: warm up and capture it anew
            self.key, self.warm, self.parts = key, 0, {}
        self.phase = "replay" if self.parts else ("capture" if self.warm >= self.warmup else "warmup")

    def end(self) -> None:
        if self.phase == "warmup":
            self.warm += 1
        elif self.phase == "capture":
            self.captures += 1

    def run(self, name: str, fn: Part, inputs: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], object]:
        if self.phase == "warmup":
            return self._warmup(fn, list(inputs))
        if self.phase == "capture":
            part = self.parts[name] = self._capture(name, fn, [t if _is_static(t, self.parts) else t.clone()
                                                               for t in inputs])
        else:
            part = self.parts[name]
            for dst, src in zip(part.inputs, inputs):
                if dst is not src:
                    dst.copy_(src)
        self._replay(part, fn)
        return part.outputs, part.aux

    def _warmup(self, fn: Part, inputs: list[torch.Tensor]):
        if not self.cuda:
            return fn(inputs)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = fn(inputs)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def _capture(self, name: str, fn: Part, inputs: list[torch.Tensor]) -> _Captured:
        if not self.cuda:  # the stand-in: run once now (replay runs it again), and hold the outputs
            with _NoHostRead(name):
                outputs, aux = fn(inputs)
            return _Captured(inputs, tuple(t.detach() for t in outputs), aux, None)
        graph = torch.cuda.CUDAGraph()
        pool = next((p.graph.pool() for p in self.parts.values() if p.graph is not None), None)
        try:
            # thread_local: only this thread's CUDA calls must be capture-safe, not those of other threads
            with torch.cuda.graph(graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"):
                outputs, aux = fn(inputs)
        except RuntimeError as e:
            raise RuntimeError(f"train.cuda_graph: capturing the step's {name} part failed ({e}); run without "
                               f"train.cuda_graph (the same step, uncaptured)") from e
        return _Captured(inputs, tuple(t.detach() for t in outputs), aux, graph)

    def _replay(self, part: _Captured, fn: Part) -> None:
        if part.graph is not None:
            part.graph.replay()
            return
        if self.phase == "capture":  # the stand-in ran it while capturing
            return
        outputs, _ = fn(part.inputs)
        for dst, src in zip(part.outputs, outputs):
            dst.copy_(src)


def _is_static(t: torch.Tensor, parts: dict[str, _Captured]) -> bool:
    """An input that is an earlier part's output (e.g. the skip flag) is already static: no copy."""
    return any(t is o for p in parts.values() for o in p.outputs)
