"""The optimizer: AdamW8bit (bitsandbytes) or AdamW over one group per module, or per parameter."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .config_schema import Config
from .memory import PerParamOptimizer
from .trainables import Trainables

log = logging.getLogger(__name__)


def learning_rates(cfg: Config) -> dict[str, float | None]:
    """The configured base learning rate of each parameter group."""
    return {"unet": cfg.training.lr_unet, "text_encoder": cfg.training.lr_text_encoder_1,
            "text_encoder_2": cfg.training.lr_text_encoder_2}


def _optimizer_factory(cfg: Config) -> tuple[Callable[[list[dict]], torch.optim.Optimizer], str]:
    """How to build the configured optimizer over some parameter groups, and its name for the log."""
    o = cfg.optimizer
    if o.type == "adafactor":
        from transformers.optimization import Adafactor
        # the configured rate drives it (LR schedule and all): no relative step, no parameter scaling, no warmup
        return (lambda groups: Adafactor(groups, lr=groups[0]["lr"], scale_parameter=False, relative_step=False,
                                         warmup_init=False, weight_decay=o.weight_decay)), \
            "Adafactor (transformers, factored second moment, no first moment)"
    kwargs = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
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


def build_optimizer(cfg: Config, trainables: Trainables,
                    rounding_generator: torch.Generator | None = None) -> tuple[Any, str]:
    """AdamW8bit from bitsandbytes (torch AdamW when asked, or when bitsandbytes is missing).

    With model.full_bf16 or training.fused_backward the optimizer steps one parameter at a time
    (sdxl_ff/memory.py); otherwise it is one optimizer over one parameter group per module.
    """
    rates = learning_rates(cfg)
    make, name = _optimizer_factory(cfg)
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


def optimizer_kind(cfg: Config) -> str:
    """The optimizer's type and layout, as recorded in the trainer state (its state only loads into the same)."""
    per_param = cfg.model.full_bf16 or cfg.training.fused_backward
    return f"{cfg.optimizer.type}{' per parameter' if per_param else ''}"
