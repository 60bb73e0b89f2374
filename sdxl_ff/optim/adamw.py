"""AdamW in one optimizer for every memory mode, with no host-device sync in its step, each also stepping one
parameter at a time from a backward hook (training.fused_backward):
- fp32 weights: torch's AdamW (fused=True on CUDA, foreach on the CPU), or bitsandbytes' AdamW8bit without its
  host wait after every parameter (`BitsandbytesAdamW8bit`);
- bf16 weights (model.full_bf16) and FSDP2's DTensors: torchao's AdamW8bit or 32-bit AdamW, whose update of one
  parameter reads the bf16 weight, computes in fp32 inside the kernel and rounds back stochastically, so no fp32
  copy of any weight is kept (compiled per parameter shape on CUDA: SDXL's UNet has 44; eager on the CPU).

Why bitsandbytes' kernels for fp32 weights and torchao's for bf16 ones (issue 25, measured on this CPU):
- bitsandbytes 0.50.2's `Optimizer8bit.step()` calls `torch.cuda.synchronize()` after every parameter (`sync_gpu`
  in bitsandbytes/optim/optimizer.py): 1,680 host waits per SDXL step. Its kernels run on the current stream in
  order and nothing on the host reads their results between parameters, so the wait orders nothing; only paged
  state (unified memory, which sdxl-ff never builds) needs it. Without it bitsandbytes' maths and state are
  unchanged: a state saved before resumes as it was (bitsandbytes PR #2050 removes the same wait).
- bitsandbytes rounds bf16 weights to nearest, so updates below bf16's spacing vanish, and it cannot step
  DTensors: torchao's `bf16_stochastic_round` and DTensor support are the reason for torchao there.
- Measured (1,680 tensors of 4,096 values, 1 thread): bitsandbytes' CPU step 0.35 ms per tensor, torchao's eager
  step 2.4 ms (its branchless quantisation is written for the compiler; 0.6 ms with `eager_update_on_cpu` and one
  `bucketize`, 0.3 ms with codes8's table lookups), its compiled CPU step 1.0 ms after compiling each shape; on one
  tensor of 4 M values the eager step's CPU time went from 500 ms (bucketize) to 132 ms (codes8).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sdxl_ff.optim.codes8 import codes_of


class StepsOneParam:
    """What the trainer's fused backward pass needs of an optimizer: `step_param(p)` updates one parameter from
    its gradient and frees the gradient; `attach_fused_backward()` calls it from each parameter's
    post-accumulate-grad hook, so at most one gradient is alive. `step()` then finds no gradient left."""

    _hooks: list
    peak_grad_bytes: int = 0

    def _place(self, param: torch.Tensor) -> tuple[int, int]:
        """(group index, index in the group) of a parameter; indices, as loading a state replaces the groups."""
        places = self.__dict__.setdefault("_places", {})
        if param not in places:
            places.update({p: (g, i) for g, group in enumerate(self.param_groups)
                           for i, p in enumerate(group["params"])})
        return places[param]

    @property
    def fused(self) -> bool:
        return bool(self.__dict__.get("_hooks"))

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        self.peak_grad_bytes = max(self.peak_grad_bytes, param.grad.numel() * param.grad.element_size())
        gindex, pindex = self._place(param)
        self._step_one(self.param_groups[gindex], param, gindex, pindex)
        param.grad = None

    def _step_one(self, group: dict, param: torch.Tensor, gindex: int, pindex: int) -> None:
        raise NotImplementedError

    def attach_fused_backward(self) -> None:
        hooks = self.__dict__.setdefault("_hooks", [])
        for group in self.param_groups:
            for param in group["params"]:
                hooks.append(param.register_post_accumulate_grad_hook(self.step_param))

    def detach_fused_backward(self) -> None:
        """Remove the hooks again (the parameters outlive this optimizer, e.g. in a benchmark)."""
        for hook in self.__dict__.get("_hooks", []):
            hook.remove()
        self.__dict__["_hooks"] = []


class TorchAdamW(StepsOneParam, torch.optim.AdamW):
    """torch's AdamW (fused=True on CUDA: one kernel over all tensors; foreach on the CPU).

    Over FSDP2's DTensors it steps each process's local shards: torch's fused and foreach kernels take lists of
    tensors, and DTensor works out the placement of a list op anew on every call (no cache for lists), on the host,
    per tensor: 1-2 CPU-seconds per step of the tiny SDXL on two processes, more than its forward and backward.
    AdamW is elementwise and weight, gradient and moments share one placement, so the kernels on the local shards
    compute what the DTensor ops compute; the state stays DTensors (sharded checkpoints save it as before).
    """

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        # torch.optim.Adam.step fills these lists here and passes them to its kernels next: the hook for local shards
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        lists = [tensors for tensors in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs) if tensors]
        shards = [local_shards(*of_one_param) for of_one_param in zip(*lists, strict=True)]
        if shards and all(shard is not None for shard in shards):
            for tensors, local in zip(lists, zip(*shards, strict=True), strict=True):
                tensors[:] = local
        return has_complex

    def load_state_dict(self, state_dict: dict) -> None:
        # torch places each loaded step counter by the flags of the *saved* group (on the host for foreach, on
        # the weight's device for fused): a state of a foreach run (sdxl-ff before fused) must load as fused
        flags = ("fused", "foreach", "capturable")
        groups = [{**saved, **{k: now[k] for k in flags if k in now}}
                  for saved, now in zip(state_dict["param_groups"], self.param_groups, strict=True)]
        super().load_state_dict({**state_dict, "param_groups": groups})

    def _step_one(self, group: dict, param: torch.Tensor, gindex: int, pindex: int) -> None:
        # torch's own step over a one-parameter copy of the group: the same kernel (fused or foreach) and the
        # same maths as the step over all parameters, bit for bit
        groups = self.param_groups
        self.param_groups = [{**group, "params": [param]}]
        try:
            torch.optim.AdamW.step(self)
        finally:
            self.param_groups = groups


@functools.cache
def bitsandbytes_adamw8bit() -> type:
    """bitsandbytes' AdamW8bit whose step does not wait for the device after each parameter (see above)."""
    import bitsandbytes as bnb

    class BitsandbytesAdamW8bit(StepsOneParam, bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            for gindex, group in enumerate(self.param_groups):
                for pindex, param in enumerate(group["params"]):
                    if param.grad is not None:
                        self._step_one(group, param, gindex, pindex)

        def _step_one(self, group: dict, param: torch.Tensor, gindex: int, pindex: int) -> None:
            """`Optimizer8bit.step()` for one parameter, without its `sync_gpu(p)`."""
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            if not self.state[param]:
                self.init_state(group, param, gindex, pindex)
            self.prefetch_state(param)
            self.update_step(group, param, gindex, pindex)

    BitsandbytesAdamW8bit.__module__ = __name__
    return BitsandbytesAdamW8bit


@contextlib.contextmanager
def drawing_from(generator: torch.Generator | None) -> Iterator[None]:
    """Let the random draws within (torchao's stochastic rounding, eager or compiled, draws from the process's
    default generator) come from `generator` instead, which the trainer state saves: resume stays bit-exact and
    every process rounds its identical replica identically. Host-side state only: no device sync."""
    if generator is None:
        yield
        return
    if generator.device.type == "cuda":
        index = generator.device.index
        default = torch.cuda.default_generators[torch.cuda.current_device() if index is None else index]
    else:
        default = torch.default_generator
    outer = default.get_state()
    default.set_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(default.get_state())
        default.set_state(outer)


_compiled_update = None


def single_param_update(param: torch.Tensor):
    """torchao's update of one parameter: compiled on CUDA (fullgraph, one static shape per graph, as torchao
    runs it); eager on the CPU and under a dispatch mode (an op counter, FakeTensorMode), which torch.compile
    refuses."""
    from torchao.optim.adam import single_param_adam
    global _compiled_update
    if param.device.type == "cuda" and _get_current_dispatch_mode() is None:
        if _compiled_update is None:
            _compiled_update = torch.compile(single_param_adam, fullgraph=True, dynamic=False)
        return _compiled_update
    if param.device.type == "cpu" and type(param) is torch.Tensor:
        return eager_update_on_cpu
    if param.device.type == "cpu" and is_dtensor(param) and _get_current_dispatch_mode() is None:
        return shard_update_on_cpu
    return single_param_adam


def eager_update_on_cpu(p, grad, step, exp_avg, exp_avg_sq, *args) -> None:
    """torchao's `single_param_adam` over the dequantised moments, quantised back by codes8's tables.

    Eager, torchao's 8-bit state runs its quantisation as a branchless binary search (about 40 ops per tensor,
    written for the compiler): 5x slower than bitsandbytes' CPU step on the tiny SDXL, and every CPU test
    trains with it. Same maths: the same codes of the same map, the same block scales.
    """
    from torchao.optim.adam import single_param_adam
    moments = [dequantized(exp_avg), dequantized(exp_avg_sq)]
    single_param_adam(p, grad, step, *moments, *args)
    for state, value in zip((exp_avg, exp_avg_sq), moments, strict=True):
        if value is not state:
            quantize_into(state, value)


def shard_update_on_cpu(p, grad, step, exp_avg, exp_avg_sq, *args) -> None:
    """`eager_update_on_cpu` on each process's own shard of FSDP2's DTensors: the update is elementwise and weight,
    gradient and moments share one placement, so it is what torchao's update of the DTensors computes (its rounding
    draws, too, are taken over the local shard), without DTensor's dispatch of each op and torchao's search."""
    if (local := local_shards(p, grad, exp_avg, exp_avg_sq)) is None:
        from torchao.optim.adam import single_param_adam
        return single_param_adam(p, grad, step, exp_avg, exp_avg_sq, *args)
    eager_update_on_cpu(local[0], local[1], step, local[2], local[3], *args)


def local_shards(param: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor] | None:
    """The local shards (views) of a DTensor parameter and of its gradient and moments when they all share its
    placement, so that an elementwise update of them is the update of the DTensors; else None."""
    if not is_dtensor(param) or any(not is_dtensor(t) or t.placements != param.placements for t in tensors):
        return None
    return [t.to_local() for t in (param, *tensors)]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor, without importing torch.distributed.tensor (2 s) where nothing made one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def dequantized(state: torch.Tensor) -> torch.Tensor:
    """The fp32 values of a torchao 8-bit state (the state itself when it is a plain tensor)."""
    if not hasattr(state, "codes"):
        return state
    values = state.qmap.index_select(0, state.codes.view(-1).int()).view(-1, state.block_size)
    return (values * state.scale.view(-1, 1)).view(state.shape)


def quantize_into(state: torch.Tensor, value: torch.Tensor) -> None:
    """Store `value` in a torchao 8-bit state as torchao does (`scale_tensor`, `quantize_8bit_with_qmap`): per
    block the scale is the largest magnitude; each scaled value gets torchao's code from codes8's tables."""
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned
    scale = value.view(-1, state.block_size).abs().amax(-1).clip(1e-12)
    scaled = (value.view(-1, state.block_size) / scale.view(-1, 1)).view(-1)
    # the map by the state's kind, as torchao's OptimState8bit.zeros builds it (reading state.qmap back to the
    # host would be a device read per tensor)
    qmap = get_qmap_signed() if state.signed else get_qmap_unsigned()
    state.codes.copy_(codes_of(scaled, qmap).view(state.shape))
    state.scale.copy_(scale)


class TorchaoSteps(StepsOneParam):
    """torchao's AdamW (8-bit or 32-bit state), stepped by sdxl-ff: `rounding_generator` drives the stochastic
    rounding of bf16 weights; moments stay fp32 (or 8-bit) beside bf16 weights, also through a resume."""

    def __init__(self, params, *, rounding_generator: torch.Generator | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.rounding_generator = rounding_generator

    def _new_buffer(self, p: torch.Tensor, signed: bool):
        # torchao keeps the moments of a bf16 weight in bf16 where it does not quantise them (tensors under
        # 4,096 values): (1 - beta2) * g^2 then falls below bf16's spacing and the second moment stops moving
        buffer = super()._new_buffer(p, signed)
        return buffer if buffer.dtype == torch.float32 else buffer.float()

    def _rounding(self) -> contextlib.AbstractContextManager:
        return drawing_from(self.rounding_generator if self.bf16_stochastic_round else None)

    @torch.no_grad()
    def step(self, closure=None):
        with self._rounding():
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        self._update(group, param)

    def _step_one(self, group: dict, param: torch.Tensor, gindex: int, pindex: int) -> None:
        with self._rounding():
            self._update(group, param)

    def _update(self, group: dict, p: torch.Tensor) -> None:
        """torchao's `_AdamBase.step` for one parameter (amsgrad, which no config asks for, left out)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # on the host: a host-side counter, read by the kernel as a scalar
            state["exp_avg"] = self._new_buffer(p, True)
            state["exp_avg_sq"] = self._new_buffer(p, False)
        state["step"] += 1
        with torch._dynamo.utils.disable_cache_limit():  # one graph per parameter shape: a fixed number
            weight = p.detach()
            single_param_update(weight)(weight, p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None,
                                   group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                                   group["eps"], True, self.bf16_stochastic_round and p.dtype is torch.bfloat16)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded moments to the weight's dtype: fp32 moments of a bf16 weight would lose their
        # low bits; put them back as saved (on the weight's device)
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(ids, params, strict=True))
        for index, saved in state_dict["state"].items():
            param = by_id[index]
            for key, value in saved.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(param.device)


@functools.cache
def torchao_adamw(eight_bit: bool) -> type:
    """The optimizer class over torchao's AdamW8bit (8-bit state) or its 32-bit AdamW (`_AdamW`, what torchao
    builds its bf16 stochastic-rounding AdamW on). Imported on use: torchao takes seconds to import."""
    from torchao.optim import AdamW8bit, _AdamW

    base = AdamW8bit if eight_bit else _AdamW
    return type(f"Torchao{base.__name__}", (TorchaoSteps, base), {"__module__": __name__})
