"""The exponential moving average of a model's weights: what the trainer exports and samples from.

The EMA keeps fp32 copies of every floating-point parameter and buffer (BN statistics included) on the
model's device and blends them in with foreach ops: one kernel launch per group of tensors instead of a
Python loop of 2 x 131 small ops. Integer buffers (BN's `num_batches_tracked`) are copied, not averaged.

`torch.optim.swa_utils.AveragedModel` is not used: it deep-copies the module (a bf16 copy under DeepSpeed,
an empty shell under ZeRO-3), its first update copies instead of blending, and it averages integer buffers.
"""
from __future__ import annotations

import contextlib

import torch


def _strip(name: str) -> str:
    return name.removeprefix("_orig_mod.")  # torch.compile's wrapper prefix


def ema_decay_at(decay: float, updates: int) -> float:
    """A short warm-up, so that early exports are not the initial weights."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA:
    """fp32 EMA of `model.state_dict()`'s floating-point entries; integer entries are copied."""

    def __init__(self, model: torch.nn.Module, decay: float, *, stable_tensors: bool = False):
        """`stable_tensors`: the model's parameter and buffer objects never change (not so under DeepSpeed,
        whose ZeRO-3 gathers them anew), so the list of them is read once instead of every update."""
        self.decay, self.stable = decay, stable_tensors
        self._sources: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.shadow: dict[str, torch.Tensor] = {}
        for k, v in model.state_dict().items():
            v = v.detach()
            self.shadow[_strip(k)] = v.float().clone() if v.is_floating_point() else v.clone()
        self._float_keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        self._int_keys = [k for k, v in self.shadow.items() if not v.is_floating_point()]

    @property
    def device(self) -> torch.device:
        return next(iter(self.shadow.values())).device

    def _read_sources(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        state = {_strip(k): v.detach() for k, v in model.state_dict(keep_vars=True).items()}  # views, no copies
        return [state[k] for k in self._float_keys], [state[k] for k in self._int_keys]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, updates: int, replace: dict[str, torch.Tensor] | None = None) -> None:
        """Blend in the model's current weights; `updates` is the optimizer-update count after this one.

        `replace`: {name: tensor} read instead of the model's floating-point entry of that name. The trainer
        passes the buffers as they were before the forward pass it has just queued (when it updates the EMA
        one step late, train.sync_free): the parameters are still the step's, the batch-norm statistics not."""
        sources = self._sources if self._sources is not None else self._read_sources(model)
        if self.stable:
            self._sources = sources
        floats, ints = sources
        if replace:
            floats = [replace.get(k, v) for k, v in zip(self._float_keys, floats)]
        ema = [self.shadow[k] for k in self._float_keys]
        cur = [v if v.dtype == torch.float32 else v.float() for v in floats]
        torch._foreach_lerp_(ema, cur, 1 - ema_decay_at(self.decay, updates))
        if not self.stable:  # else tensors() reads them from the model: no copy per step
            for k, v in zip(self._int_keys, ints):
                self.shadow[k].copy_(v)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged weights on their device: fp32 floats, and the integer buffers as of the last update
        (with stable tensors, the model's own, which a skipped step leaves as they were)."""
        if self.stable and self._sources is not None:
            return {**self.shadow, **dict(zip(self._int_keys, self._sources[1]))}
        return dict(self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies, the layout of `ema.safetensors` and of the export's weights."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.tensors().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in self.shadow.items():
            v.copy_(state[k].to(v.dtype))


def full_params(model: torch.nn.Module, is_ds: bool):
    """Under ZeRO-3 each rank holds a slice of every parameter: gather them for the EMA (costly, but
    the EMA is what gets exported). Elsewhere a no-op."""
    if is_ds and any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()
