"""The run's one parallelism strategy, chosen once: one process, DDP (data parallel) or FSDP2 (training.sharding).

As torchtitan's ParallelDims, `Parallelism.for_run(cfg, accelerator)` decides once, and the trainer asks the object
instead of the config: how the trained modules are wrapped and which optimizer steps them, where the EMA lives,
what a checkpoint holds and how it is written and read back, the weights gathered for eval images, and the bytes
each process holds. Nothing outside sdxl_ff/parallel/ (and config/, which checks the key) reads training.sharding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from sdxl_ff.checkpoint.checkpointer import SHARDS_NAME, Checkpointer, check_sharding, load_resume_state
from sdxl_ff.checkpoint.model_folder import save_final, write_model_folder
from sdxl_ff.config.rules import shards_model
from sdxl_ff.config.schema import Config
from sdxl_ff.model.parts import SDXLParts
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.optim.ema import EMA
from sdxl_ff.optim.optimizers import build_optimizer, optimizer_impl, optimizer_kind
from sdxl_ff.parallel.fsdp2 import check_processes, shard_trained, watch_held_bytes
from sdxl_ff.parallel.fsdp2_state import ema_meta, eval_parts, load_shards, save_final_sharded, save_sharded_checkpoint
from sdxl_ff.parallel.processes import prepare

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sdxl_ff.checkpoint.progress import TrainProgress

log = logging.getLogger("sdxl_ff")


class TrainingRun(Protocol):
    """What a strategy reads of the run it saves and restores (sdxl_ff/train/run.py: Run)."""
    cfg: Config
    accelerator: Accelerator
    parts: SDXLParts
    trainables: Trainables
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    checkpointer: Checkpointer
    progress: TrainProgress

    def state_dict(self, with_ema: bool = True) -> dict: ...


class Parallelism:
    """One process: the modules and optimizer as accelerate prepares them, everything whole, the EMA here."""
    name = "one process"
    sharding = "none"  # the training.sharding a resumed state must have been written with
    shards_parameters = False  # each process holds 1/N of every trained weight (FSDP2's DTensors)

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator

    @staticmethod
    def for_run(cfg: Config, accelerator: Accelerator) -> Parallelism:
        """The strategy of this run; refuses, on every process alike, what it cannot do (before anything loads)."""
        if shards_model(cfg):
            return FSDP2(cfg, accelerator)
        return DDP(cfg, accelerator) if accelerator.num_processes > 1 else Single(cfg, accelerator)

    # --------------------------------------------------------------------------- building

    def optimizer_kind(self) -> str:
        """The optimizer's type and layout as the trainer state records it (its state loads only into the same)."""
        return optimizer_kind(self.cfg, sharded=self.shards_parameters)

    def optimizer_impl(self) -> str:
        """The implementation whose state the optimizer keeps (recorded in the trainer state)."""
        return optimizer_impl(self.cfg, sharded=self.shards_parameters)

    def wrap(self, trainables: Trainables,
             rounding_generator: torch.Generator) -> tuple[list[torch.nn.Module], torch.optim.Optimizer, str]:
        """(the trained modules as they run, the optimizer over them, its name): accelerate's prepare."""
        optimizer, name = build_optimizer(self.cfg, trainables, rounding_generator, sharded=False)
        modules, optimizer = prepare(self.accelerator, trainables, optimizer)
        return modules, optimizer, name

    @property
    def keeps_ema(self) -> bool:
        """Whether this process keeps the EMA: only the main process saves and evaluates it (the others would keep
        a copy of the weights for nothing)."""
        return self.accelerator.is_main_process

    def watch_held_bytes(self, optimizer: torch.optim.Optimizer,
                         params: list[torch.nn.Parameter]) -> dict[str, int] | None:
        """What this process holds, measured at the first step (a dict that fills then); None: not measured."""
        return None

    # --------------------------------------------------------------------------- checkpoints

    def resume_state(self) -> dict | None:
        """The trainer state to continue from (training.resume_from), refused if written under other parallelism."""
        state = load_resume_state(self.cfg, self.accelerator)
        if state is not None:
            check_sharding(state.get("sharding"), self.sharding, self.accelerator.num_processes,
                           self.cfg.training.resume_state_path)
        return state

    def held_state(self, optimizer: torch.optim.Optimizer, ema: EMA | None, with_ema: bool) -> dict:
        """The optimizer and EMA entries of trainer_state.pt."""
        return {"optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None and with_ema else None}

    def load_held_state(self, run: TrainingRun, state: dict) -> None:
        """Bring back what `held_state` saved that the optimizer's restore does not: the EMA."""
        if run.ema is not None and state["ema"]:
            run.ema.load_state_dict(state["ema"])

    def save_checkpoint(self, run: TrainingRun) -> Path | None:
        """A numbered checkpoint, written by the main process (its path there); the others wait for it."""
        path = None
        if self.accelerator.is_main_process:
            path = run.checkpointer.save(run.progress.global_step, lambda tmp: write_model_folder(
                tmp, run.cfg, run.parts, run.trainables, self.accelerator, run.state_dict()))
            log.info("checkpoint: %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def save_final(self, run: TrainingRun) -> None:
        """The final Diffusers folder and trainer state (the EMA swapped in), written by the main process."""
        if self.accelerator.is_main_process:
            save_final(run.cfg, run.parts, run.trainables, self.accelerator, run.state_dict(with_ema=False), run.ema)

    # --------------------------------------------------------------------------- eval

    @contextlib.contextmanager
    def eval_parts(self, parts: SDXLParts, weights: contextlib.AbstractContextManager | None
                   ) -> Iterator[tuple[SDXLParts | None, contextlib.AbstractContextManager | None]]:
        """(the parts to render eval images with on the main process, the weights still to swap in while rendering)."""
        yield parts, weights


class Single(Parallelism):
    """One process."""


class DDP(Parallelism):
    """Several processes, each with the whole model: accelerate's DistributedDataParallel all-reduces the gradients."""
    name = "DDP"


class FSDP2(Parallelism):
    """training.sharding "fsdp2": the trained modules sharded over the processes with PyTorch's FSDP2 (fsdp2.py);
    optimizer state and EMA per shard, saved with DCP next to the whole model (fsdp2_state.py)."""
    name = "FSDP2"
    sharding = "fsdp2"
    shards_parameters = True

    def __init__(self, cfg: Config, accelerator: Accelerator):
        check_processes(accelerator.num_processes, accelerator.mixed_precision)
        super().__init__(cfg, accelerator)

    def wrap(self, trainables: Trainables,
             rounding_generator: torch.Generator) -> tuple[list[torch.nn.Module], torch.optim.Optimizer, str]:
        """Sharded in place before the optimizer is built (it steps each process's shards; torchao's 8-bit AdamW);
        no DDP around them."""
        shard_trained(trainables.modules, self.accelerator, self.cfg.optimizer.type)
        optimizer, name = build_optimizer(self.cfg, trainables, rounding_generator, sharded=True)
        return list(trainables.modules.values()), optimizer, name

    @property
    def keeps_ema(self) -> bool:
        return True  # each process keeps the EMA of its own shards

    def watch_held_bytes(self, optimizer: torch.optim.Optimizer,
                         params: list[torch.nn.Parameter]) -> dict[str, int] | None:
        return watch_held_bytes(optimizer, params)

    def held_state(self, optimizer: torch.optim.Optimizer, ema: EMA | None, with_ema: bool) -> dict:
        """The optimizer state and the EMA's weights are in the checkpoint's shards; the EMA's counters here."""
        return {"optimizer": None, "ema": ema_meta(ema) if with_ema else None,
                "sharding": {"type": self.sharding, "world_size": self.accelerator.num_processes}}

    def load_held_state(self, run: TrainingRun, state: dict) -> None:
        load_shards(run, state, Path(self.cfg.training.resume_from) / SHARDS_NAME)

    def save_checkpoint(self, run: TrainingRun) -> Path | None:
        """Every process writes its shards; the main process writes the gathered model."""
        return save_sharded_checkpoint(run)

    def save_final(self, run: TrainingRun) -> None:
        save_final_sharded(run)

    @contextlib.contextmanager
    def eval_parts(self, parts: SDXLParts, weights: contextlib.AbstractContextManager | None
                   ) -> Iterator[tuple[SDXLParts | None, contextlib.AbstractContextManager | None]]:
        """Every process gathers its shards (the EMA's when `weights` swaps it in) once; whole on the main process."""
        with eval_parts(parts, self.accelerator, weights) as gathered:
            yield gathered, None
