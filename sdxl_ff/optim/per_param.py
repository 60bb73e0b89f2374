"""One optimizer per parameter tensor, for transformers' Adafactor with bf16 weights or the fused backward pass
(the AdamW types step one optimizer in every mode: sdxl_ff/optim/adamw.py); the bytes an optimizer keeps.

Stepping one parameter at a time (`PerParamOptimizer`):
- full bf16: weights and gradients are bf16 (2 + 2 bytes per parameter). Each parameter is
  upcast to fp32 for its own update only, then rounded back stochastically, so updates smaller
  than bf16's spacing are kept on average instead of being rounded away.
- fused backward: each parameter's update runs in a post-accumulate-grad hook as soon as its
  gradient is complete, and the gradient is freed at once, so at most one gradient is alive.
  It cannot be combined with gradient accumulation or global gradient-norm clipping (both need
  every gradient at once) nor with multi-GPU data parallelism (gradients are all-reduced later).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

BF16_LOW_BITS = 1 << 16


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 `x` to bf16 up or down at random, with P(up) equal to the distance below: E[result] = x."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, BF16_LOW_BITS, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -BF16_LOW_BITS  # keep the top 16 bits: sign, exponent, 7 mantissa bits
    return rounded.view(torch.float32).to(torch.bfloat16)


class PerParamOptimizer:
    """One optimizer per parameter tensor, stepped one parameter at a time.

    Looks enough like a torch optimizer for the trainer: `param_groups` (one per parameter, each
    with the "name" of its module group and its "lr"), `step()`, `zero_grad()`,
    `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, named_params: Iterable[tuple[str, str, torch.nn.Parameter]], rates: dict[str, float],
                 make: Callable[[list[dict]], torch.optim.Optimizer], stochastic_rounding: bool,
                 generator: torch.Generator | None = None):
        self.params: dict[str, torch.nn.Parameter] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # bf16 weights with stochastic rounding: the optimizer steps a separate fp32 tensor (the "master"),
        # filled from the weight for its own update only and empty otherwise. The weight itself never
        # changes dtype: that would drop its gradient-accumulator node and with it DDP's all-reduce hook.
        self.masters: dict[str, torch.Tensor] = {}
        for group, name, param in named_params:
            self.params[name] = param
            stepped = param
            if stochastic_rounding and param.dtype == torch.bfloat16:
                stepped = self.masters[name] = torch.empty(0, dtype=torch.float32, device=param.device)
            self.optimizers[name] = make([{"params": [stepped], "lr": rates[group], "name": group}])
        self.stochastic_rounding = stochastic_rounding
        self.generator = generator
        self._hooks: list = []
        self.peak_grad_bytes = 0

    @property
    def fused(self) -> bool:
        return bool(self._hooks)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step_param(self, name: str) -> None:
        """Update one parameter from its gradient, then free the gradient."""
        param, optimizer = self.params[name], self.optimizers[name]
        if param.grad is None:
            return
        self.peak_grad_bytes = max(self.peak_grad_bytes, param.grad.numel() * param.grad.element_size())
        master = self.masters.get(name)
        if master is None:
            optimizer.step()
        else:
            master.data = param.detach().float()  # fp32 copy for this update only
            master.grad = param.grad.float()
            optimizer.step()
            with torch.no_grad():
                param.copy_(stochastic_round_to_bf16(master, self.generator))
            self._empty_master(name)
        param.grad = None

    def _empty_master(self, name: str) -> None:
        """Free the fp32 copy between updates; the empty tensor keeps the weight's device for state loading."""
        master = self.masters[name]
        master.grad = None
        master.data = torch.empty(0, dtype=torch.float32, device=self.params[name].device)

    def step(self) -> None:
        for name in self.params:
            self.step_param(name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params.values():
            param.grad = None

    def attach_fused_backward(self) -> None:
        """Step each parameter from a hook the moment its gradient is accumulated."""
        for name, param in self.params.items():
            self._hooks.append(param.register_post_accumulate_grad_hook(
                lambda p, name=name: self.step_param(name)))

    def detach_fused_backward(self) -> None:
        """Remove the hooks again (the parameters outlive this optimizer, e.g. in a benchmark)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = self.optimizers.keys() - state.keys()
        if missing:
            raise KeyError(f"optimizer state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name, opt in self.optimizers.items():
            if name in self.masters:
                self._empty_master(name)  # on the weight's device now; fp32, so fp32 moments stay fp32
            opt.load_state_dict(state[name])

    def state_tensors(self) -> Iterable[torch.Tensor]:
        for opt in self.optimizers.values():
            yield from optimizer_state_tensors(opt)


def optimizer_state_tensors(optimizer) -> Iterable[torch.Tensor]:
    """Every tensor an optimizer keeps per parameter (moments, quantisation maps and scales)."""
    if isinstance(optimizer, PerParamOptimizer):
        yield from optimizer.state_tensors()
        return
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield from plain_tensors(value)


def plain_tensors(tensor: torch.Tensor) -> Iterable[torch.Tensor]:
    """The plain tensors that hold a tensor's bytes: a DTensor's local shard, the parts of a tensor subclass
    (torchao's 8-bit state: codes, block scales, the quantisation map), or the tensor itself."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from plain_tensors(getattr(tensor, name))
    else:
        yield tensor


def training_bytes(params: list[torch.nn.Parameter], optimizer, grad_bytes: int) -> dict[str, float]:
    """Bytes held for training: weights, gradients (as measured by the caller) and optimizer state."""
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(t.numel() * t.element_size() for t in optimizer_state_tensors(optimizer))
    n = sum(p.numel() for p in params)
    total = weights + grad_bytes + state
    return {"parameters": n, "weights": weights, "gradients": grad_bytes, "optimizer": state, "total": total,
            "bytes_per_parameter": total / n}
