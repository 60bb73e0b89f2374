"""The optimizer: AdamW8bit (bitsandbytes; torchao's over FSDP2's sharded parameters), AdamW or Adafactor over one
group per module, or per parameter."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from sdxl_ff.config.schema import Config
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.optim.per_param import PerParamOptimizer

log = logging.getLogger(__name__)


def learning_rates(cfg: Config) -> dict[str, float | None]:
    """The configured base learning rate of each parameter group."""
    return {"unet": cfg.training.lr_unet, "text_encoder": cfg.training.lr_text_encoder_1,
            "text_encoder_2": cfg.training.lr_text_encoder_2}


def _optimizer_factory(cfg: Config, on_cpu: bool = True,
                       sharded: bool = False) -> tuple[Callable[[list[dict]], torch.optim.Optimizer], str]:
    """How to build the configured optimizer over some parameter groups, and its name for the log; `sharded`:
    the parameters are FSDP2's DTensors (the run's parallelism says so, sdxl_ff/parallel/strategy.py)."""
    o = cfg.optimizer
    if o.type == "adafactor":
        from transformers.optimization import Adafactor
        # the configured rate drives it (LR schedule and all): no relative step, no parameter scaling, no warmup
        return (lambda groups: Adafactor(groups, lr=groups[0]["lr"], scale_parameter=False, relative_step=False,
                                         warmup_init=False, weight_decay=o.weight_decay)), \
            "Adafactor (transformers, factored second moment, no first moment)"
    kwargs = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.type == "adamw8bit" and sharded:  # bitsandbytes' cannot step DTensors
        from sdxl_ff.optim.optimizers import adamw8bit_factory
        return adamw8bit_factory(kwargs, on_cpu)
    if o.type == "adamw8bit":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import bitsandbytes as bnb
            return (lambda groups: bnb.optim.AdamW8bit(groups, **kwargs)), \
                f"AdamW8bit (bitsandbytes {bnb.__version__})"
        except ImportError as e:
            log.warning("optimizer.type is adamw8bit but bitsandbytes cannot be imported (%s); "
                        "using torch AdamW (32-bit state, 2x the optimizer memory)", e)
    return (lambda groups: torch.optim.AdamW(groups, **kwargs)), "AdamW (torch, 32-bit state)"


def build_optimizer(cfg: Config, trainables: Trainables, rounding_generator: torch.Generator | None = None,
                    sharded: bool = False) -> tuple[Any, str]:
    """AdamW8bit from bitsandbytes (torch AdamW when asked, or when bitsandbytes is missing; torchao's over
    `sharded` parameters).

    With model.full_bf16 or training.fused_backward the optimizer steps one parameter at a time
    (sdxl_ff/optim/per_param.py); otherwise it is one optimizer over one parameter group per module.
    """
    rates = learning_rates(cfg)
    make, name = _optimizer_factory(cfg, on_cpu=trainables.parameters()[0].device.type == "cpu", sharded=sharded)
    if not (cfg.model.full_bf16 or cfg.training.fused_backward):
        groups = [{"name": group, "params": [p for p in m.parameters() if p.requires_grad], "lr": rates[group]}
                  for group, m in trainables.modules.items()]
        return make(groups), name
    named = [(group, f"{group}.{pname}", p) for group, m in trainables.modules.items()
             for pname, p in m.named_parameters() if p.requires_grad]
    optimizer = PerParamOptimizer(named, rates, make, stochastic_rounding=cfg.model.full_bf16,
                                  generator=rounding_generator)
    modes = []
    if cfg.model.full_bf16:
        modes.append("bf16 weights with stochastic rounding")
    if cfg.training.fused_backward:
        optimizer.attach_fused_backward()
        modes.append("fused backward pass")
    return optimizer, f"{name}, per parameter ({', '.join(modes)})"


def optimizer_kind(cfg: Config, sharded: bool = False) -> str:
    """The optimizer's type and layout, as recorded in the trainer state (its state only loads into the same)."""
    per_param = cfg.model.full_bf16 or cfg.training.fused_backward
    return f"{cfg.optimizer.type}{' per parameter' if per_param else ''}{' sharded (fsdp2)' if sharded else ''}"


def eager_adamw8bit():
    """torchao's AdamW8bit, its update run without torch.compile on the CPU.

    torchao compiles the update of each parameter shape with inductor (about 200 s for the tiny UNet on the
    CPU before the first step, and per shape of SDXL's), for a step that is then about 1.5x faster; on the CPU
    the same maths runs eagerly here (`single_param_adam` is torchao's own function). On a GPU torchao's
    compiled step runs as is.
    """
    from torchao.optim import AdamW8bit
    from torchao.optim.adam import single_param_adam

    class EagerAdamW8bit(AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    single_param_adam(p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None,
                                      group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                                      group["eps"], True, False)

    return EagerAdamW8bit


def adamw8bit_factory(kwargs: dict, on_cpu: bool):
    """(make(groups), name) for torchao's AdamW8bit over sharded parameters."""
    import torchao
    from torchao.optim import AdamW8bit
    kind = eager_adamw8bit() if on_cpu else AdamW8bit
    return (lambda groups: kind(groups, **kwargs)), \
        f"AdamW8bit (torchao {torchao.__version__}, 8-bit state of each process's shard)"


def set_group_lr(group: dict, value: float) -> None:
    """Set a parameter group's rate; torchao's optimizers hold it as a tensor (their compiled step reads it
    without recompiling) and refuse a float."""
    if hasattr(group["lr"], "fill_"):  # a tensor (this module imports no torch)
        group["lr"].fill_(value)
    else:
        group["lr"] = value
