"""Saving and restoring a training.sharding "fsdp2" run.

A checkpoint of a sharded run is the same atomic folder as any other (checkpoint.py): the full Diffusers
pipeline (gathered onto the main process, which alone writes it) and trainer_state.pt, plus `sharded_state/`,
a `torch.distributed.checkpoint` (DCP) folder in which every process writes the optimizer state and EMA of its
own shard. Every process first writes its shards into a temporary folder, which the main process moves into
the checkpoint before renaming it into place: a crash at any moment leaves the previous checkpoint complete.

Weights resume from the fp32 Diffusers folder (each process keeps its shard of them, bit for bit) and the
optimizer state and EMA from the DCP folder, so a resume on the same number of processes is exact. A state
written by another number of processes is refused with both numbers (checkpoint.check_sharding): the data
order depends on it, and torchao's 8-bit blocks are cut along the shards.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import init_empty_weights
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from sdxl_ff.checkpoint.model_folder import save_outputs, write_model_folder
from sdxl_ff.model import parts as models
from sdxl_ff.model.trainables import Trainables

log = logging.getLogger("sdxl_ff")


# --------------------------------------------------------------------------- the full weights, on the main process

def plain_class(module: torch.nn.Module) -> type:
    """The model class under FSDP2's wrapper class (FSDPUNet2DConditionModel -> UNet2DConditionModel)."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def full_twin(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) module of the same class and config holding `weights`, without a second allocation:
    its parameters are created empty and take the gathered tensors themselves (buffers that are not saved, like
    CLIP's position ids, are built as usual)."""
    cls = plain_class(module)
    with init_empty_weights():
        twin = cls(module.config) if isinstance(module, PreTrainedModel) else cls.from_config(module.config)
    twin.load_state_dict(weights, assign=True)
    return twin


def gather_modules(modules: dict[str, torch.nn.Module], is_main: bool) -> dict[str, torch.nn.Module]:
    """Every process takes part; the main process gets each sharded module whole, as a plain CPU module.

    The weights are gathered tensor by tensor and each moved to the CPU at once (StateDictOptions cpu_offload),
    so the accelerator never holds more than one whole tensor, and the host holds the model once, as on one
    process. The other processes get an empty dict.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    twins = {}
    for name, module in modules.items():
        if not isinstance(module, FSDPModule):
            continue
        weights = get_model_state_dict(module, options=options)
        if is_main:
            twins[name] = full_twin(module, weights)
        del weights
    return twins


def gathered_parts(parts: models.SDXLParts, twins: dict[str, torch.nn.Module]) -> models.SDXLParts:
    return models.SDXLParts(**{**parts.__dict__, **twins})


@contextlib.contextmanager
def eval_parts(parts: models.SDXLParts, accelerator, weights=None):
    """The SDXL parts with the sharded modules whole, on the main process and its device, for eval images.

    Every process takes part in gathering (after swapping `weights`, the EMA, into its shards); None elsewhere.
    """
    trained = {n: getattr(parts, n) for n in ("unet", "text_encoder", "text_encoder_2")}
    with weights if weights is not None else contextlib.nullcontext():
        twins = gather_modules(trained, accelerator.is_main_process)
    if not accelerator.is_main_process:
        yield None
        return
    for twin in twins.values():
        twin.to(accelerator.device)
    try:
        yield gathered_parts(parts, twins)
    finally:
        twins.clear()


# --------------------------------------------------------------------------- the DCP folder

def _as_dtensor(value: torch.Tensor, like: DTensor) -> DTensor:
    """`value` (this process's shard) as a DTensor sharded like the parameter `like`."""
    return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def _container(run) -> torch.nn.Module:
    """The trained modules under one root, so the optimizer state is keyed 'unet.<parameter>' etc."""
    return torch.nn.ModuleDict(run.trainables.modules)


def _payload(run, loading_ema: bool = False) -> dict:
    """What DCP saves or loads: the optimizer state and, when it has started, the EMA shards."""
    payload = {"optimizer": get_optimizer_state_dict(_container(run), run.optimizer)}
    ema = run.ema
    if ema is not None and ema.shadow is not None:
        values = ema.shadow if loading_ema else {k: ema._ema_weight(k) for k in ema.params}
        payload["ema"] = {k: _as_dtensor(values[k], ema.params[k]) for k in ema.params}
    return payload


def stage_shards(run, folder: Path) -> None:
    """Every process writes its shards of the optimizer state and EMA into `folder` (made by the main process)."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    dcp.save(_payload(run), checkpoint_id=folder)
    accelerator.wait_for_everyone()


def load_shards(run, state: dict, folder: Path) -> None:
    """Load this process's optimizer state and EMA shards from the DCP folder of a checkpoint."""
    if not (folder / ".metadata").is_file():
        from sdxl_ff.checkpoint.checkpointer import ResumeError
        raise ResumeError(f"{folder}: missing or incomplete (no .metadata); it holds the optimizer state of a "
                          f"training.sharding \"fsdp2\" run. Resume from another checkpoint of that run")
    ema = run.ema
    if ema is not None and state["ema"]:
        ema.load_state_dict(state["ema"])  # the counters; the shadow comes from the shards
        if state["ema"].get("shadow_in_shards"):
            ema.start_empty()
    payload = _payload(run, loading_ema=True)
    # torch creates state for every parameter before loading; a parameter that never had a gradient (text
    # encoder 1's last layer: SDXL reads the penultimate) has none in the checkpoint, and gets none back
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    stepped = {key.removeprefix("optimizer.state.").rsplit(".", 1)[0] for key in saved
               if key.startswith("optimizer.state.")}  # optimizer.state.<parameter>.<exp_avg, step, ...>
    state = payload["optimizer"]["state"]
    payload["optimizer"]["state"] = {fqn: v for fqn, v in state.items() if fqn in stepped}
    dcp.load(payload, checkpoint_id=folder)
    set_optimizer_state_dict(_container(run), run.optimizer, payload["optimizer"],
                             options=StateDictOptions(strict=False))  # strict would want those parameters too
    for key, value in payload.get("ema", {}).items():  # from_local may have moved a CPU shadow (ema_on_cpu)
        ema.shadow[key].copy_(value.to_local())


def ema_meta(ema) -> dict | None:
    """The EMA's counters for trainer_state.pt; its weights are in the shards."""
    if ema is None:
        return None
    return {"decay": ema.decay, "update_every": ema.update_every, "start_step": ema.start_step,
            "started_at": ema.started_at, "num_updates": ema.num_updates, "shadow": None,
            "shadow_in_shards": ema.shadow is not None}


# --------------------------------------------------------------------------- checkpoint and final save

def save_sharded_checkpoint(run) -> Path | None:
    """A numbered checkpoint of a sharded run; every process takes part, the main process writes the model."""
    step, accelerator = run.progress.global_step, run.accelerator
    staged = run.checkpointer.root / f".step-{step:07d}.shards.tmp"  # removed at start-up if a crash leaves it
    stage_shards(run, staged)
    twins = gather_modules(run.trainables.modules, accelerator.is_main_process)
    path = None
    if accelerator.is_main_process:
        path = run.checkpointer.save(step, lambda tmp: write_model_folder(
            tmp, run.cfg, gathered_parts(run.parts, twins), Trainables(twins, run.trainables.pristine),
            accelerator, run.state_dict(), shards=staged))
        log.info("checkpoint: %s", path)
    accelerator.wait_for_everyone()
    return path


def save_final_sharded(run) -> None:
    """The final save of a sharded run: the EMA swapped into every shard (model.use_ema), gathered, written once."""
    accelerator, ema = run.accelerator, run.ema
    staged = run.checkpointer.root / ".final.shards.tmp"
    with ema.applied() if ema is not None else contextlib.nullcontext(False) as ema_in_weights:
        stage_shards(run, staged)
        twins = gather_modules(run.trainables.modules, accelerator.is_main_process)
    if accelerator.is_main_process:
        if ema is not None:
            log.info("final save: %s", "EMA weights" if ema_in_weights else
                     f"trained weights (the EMA never started: lr_warmup_steps {run.cfg.training.lr_warmup_steps})")
        state = {**run.state_dict(), "ema_in_weights": bool(ema_in_weights)}
        save_outputs(run.cfg, gathered_parts(run.parts, twins), Trainables(twins, run.trainables.pristine),
                     accelerator, state, shards=staged)
        with contextlib.suppress(OSError):  # the staging made checkpoints/; a run without checkpoints has none
            run.checkpointer.root.rmdir()
    accelerator.wait_for_everyone()
