"""The optimizer: AdamW8bit, AdamW or Adafactor, one parameter group per trained module (the implementation by
weights and sharding, sdxl_ff/optim/adamw.py); its name for the log and its implementation for the trainer state."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sdxl_ff.config.schema import Config
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.optim.adamw import TorchAdamW, bitsandbytes_adamw8bit, torchao_adamw
from sdxl_ff.optim.per_param import PerParamOptimizer

log = logging.getLogger(__name__)

# optimizer_impl(): what wrote an optimizer state, recorded in the trainer state; a state loads only into the same
TORCH_ADAMW = "torch.optim.AdamW"
BNB_ADAMW8BIT = "bitsandbytes AdamW8bit"
TORCHAO_ADAMW8BIT = "torchao.optim.AdamW8bit"
TORCHAO_ADAMW = "torchao.optim._AdamW (fp32 state)"
ADAFACTOR = "transformers Adafactor"
ADAFACTOR_PER_PARAM = "transformers Adafactor, one per parameter"


def learning_rates(cfg: Config) -> dict[str, float | None]:
    """The configured base learning rate of each parameter group."""
    return {"unet": cfg.training.lr_unet, "text_encoder": cfg.training.lr_text_encoder_1,
            "text_encoder_2": cfg.training.lr_text_encoder_2}


def optimizer_impl(cfg: Config, sharded: bool = False) -> str:
    """The implementation whose state the configured optimizer keeps (recorded in the trainer state).

    fp32 weights step torch's AdamW or bitsandbytes' AdamW8bit, also with the fused backward pass; bf16 weights
    (stochastic rounding) and FSDP2's DTensors step torchao's (sdxl_ff/optim/adamw.py says why).
    """
    o, m = cfg.optimizer, cfg.model
    if o.type == "adafactor":
        return ADAFACTOR_PER_PARAM if m.full_bf16 or cfg.training.fused_backward else ADAFACTOR
    if o.type == "adamw8bit":
        return TORCHAO_ADAMW8BIT if m.full_bf16 or sharded else BNB_ADAMW8BIT
    return TORCHAO_ADAMW if m.full_bf16 else TORCH_ADAMW


def build_optimizer(cfg: Config, trainables: Trainables, rounding_generator: torch.Generator | None = None, *,
                    sharded: bool = False) -> tuple[Any, str]:
    """The configured optimizer over one parameter group per trained module, and its description for the log.

    `rounding_generator` drives the stochastic rounding of bf16 weights (model.full_bf16); `sharded` (the run's
    parallelism says so, sdxl_ff/parallel/strategy.py) names the state as each process's shard. With
    training.fused_backward each parameter steps from its backward hook.
    """
    o, rates = cfg.optimizer, learning_rates(cfg)
    on_cuda = trainables.parameters()[0].device.type == "cuda"
    groups = [{"name": group, "params": [p for p in m.parameters() if p.requires_grad], "lr": rates[group]}
              for group, m in trainables.modules.items()]
    adam = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    impl = optimizer_impl(cfg, sharded)
    if o.type == "adafactor":
        return _adafactor(cfg, trainables, groups, rounding_generator)
    if impl == TORCH_ADAMW:
        optimizer = TorchAdamW(groups, fused=on_cuda, foreach=not on_cuda, **adam)
        name = f"AdamW (torch {torch.__version__.split('+')[0]}, {'fused' if on_cuda else 'foreach'}, 32-bit state)"
    elif impl == BNB_ADAMW8BIT:
        import bitsandbytes
        optimizer = bitsandbytes_adamw8bit()(groups, **adam)
        name = (f"AdamW8bit (bitsandbytes {bitsandbytes.__version__}, 8-bit state for tensors of 4096+ values, "
                f"no host wait per tensor)")
    else:
        import torchao
        eight_bit = impl == TORCHAO_ADAMW8BIT
        optimizer = torchao_adamw(eight_bit)(groups, bf16_stochastic_round=cfg.model.full_bf16,
                                            rounding_generator=rounding_generator, **adam)
        state = f"{'8-bit' if eight_bit else '32-bit'} state " + \
            ("of each process's shard" if sharded else "for tensors of 4096+ values" if eight_bit else "")
        name = (f"{'AdamW8bit' if eight_bit else 'AdamW'} (torchao {torchao.__version__}, {state.strip()}), "
                f"{'compiled' if on_cuda else 'eager'} update per tensor")
    if sharded and impl not in (TORCHAO_ADAMW8BIT, TORCHAO_ADAMW):
        name += ", each process's shard"
    if cfg.model.full_bf16:
        name += ", bf16 weights with stochastic rounding"
    if cfg.training.fused_backward:
        optimizer.attach_fused_backward()
        name += ", fused backward pass"
    return optimizer, name


def _adafactor(cfg: Config, trainables: Trainables, groups: list[dict],
               rounding_generator: torch.Generator | None) -> tuple[Any, str]:
    """transformers' Adafactor; with full_bf16 or fused_backward one per parameter (sdxl_ff/optim/per_param.py)."""
    from transformers.optimization import Adafactor

    def make(param_groups: list[dict]) -> Adafactor:
        # the configured rate drives it (LR schedule and all): no relative step, no parameter scaling, no warmup
        return Adafactor(param_groups, lr=param_groups[0]["lr"], scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.optimizer.weight_decay)
    name = "Adafactor (transformers, factored second moment, no first moment)"
    if not (cfg.model.full_bf16 or cfg.training.fused_backward):
        return make(groups), name
    named = [(group, f"{group}.{pname}", p) for group, m in trainables.modules.items()
             for pname, p in m.named_parameters() if p.requires_grad]
    optimizer = PerParamOptimizer(named, learning_rates(cfg), make, stochastic_rounding=cfg.model.full_bf16,
                                  generator=rounding_generator)
    modes = ["bf16 weights with stochastic rounding"] if cfg.model.full_bf16 else []
    if cfg.training.fused_backward:
        optimizer.attach_fused_backward()
        modes.append("fused backward pass")
    return optimizer, f"{name}, per parameter ({', '.join(modes)})"


def optimizer_kind(cfg: Config, sharded: bool = False) -> str:
    """The optimizer's type and layout, as recorded in the trainer state (its state only loads into the same);
    `sharded`: over FSDP2's shards (the run's parallelism says so, sdxl_ff/parallel/strategy.py)."""
    per_param = cfg.optimizer.type == "adafactor" and (cfg.model.full_bf16 or cfg.training.fused_backward)
    return f"{cfg.optimizer.type}{' per parameter' if per_param else ''}{' sharded (fsdp2)' if sharded else ''}"


def legacy_optimizer_impl(kind: str) -> str:
    """The implementation behind a trainer state written before states recorded it, from its optimizer kind."""
    if kind.startswith("adafactor"):
        return ADAFACTOR_PER_PARAM if "per parameter" in kind else ADAFACTOR
    if "per parameter" in kind:
        return f"one {'bitsandbytes AdamW8bit' if kind.startswith('adamw8bit') else 'torch AdamW'} per parameter"
    if kind.startswith("adamw8bit"):
        return TORCHAO_ADAMW8BIT if " sharded" in kind else BNB_ADAMW8BIT  # "adamw8bit sharded (fsdp2)"
    return TORCH_ADAMW


def set_group_lr(group: dict, value: float) -> None:
    """Set a parameter group's rate; torchao's optimizers hold it as a tensor (their compiled step reads it
    without recompiling) and refuse a float."""
    if hasattr(group["lr"], "fill_"):  # a tensor (this module imports no torch)
        group["lr"].fill_(value)
    else:
        group["lr"] = value
