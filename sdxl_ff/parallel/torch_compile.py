"""model.use_torch_compile: the whole UNet, or each of its repeated blocks ("regional"); inductor's cache folder
and the time every compile takes, in the log.

Regional: diffusers' `compile_repeated_blocks` compiles the classes in the UNet's `_repeated_blocks` (SDXL's
BasicTransformerBlocks), and every ResnetBlock2D is compiled beside them; the UNet's own forward stays eager.
Blocks of one class share their compiled code, and with dynamic shapes another bucket (another height, width
or batch) reuses it instead of compiling again: only batch 1 against larger batches, and structurally different
blocks (a ResnetBlock2D with or without its shortcut convolution), compile apart.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import ModelConfig
from sdxl_ff.model.trainables import plain_module
from sdxl_ff.parallel.accelerator import compile_unet

log = logging.getLogger(__name__)

REGIONAL_BLOCKS = ("ResnetBlock2D",)  # compiled beside diffusers' _repeated_blocks (SDXL: BasicTransformerBlock)
# every compiled graph of the blocks is an entry of one code object (nn.Module._call_impl); past dynamo's default
# limit of 8 a new shape would run eager with only a warning
RECOMPILE_LIMIT = 64


def apply_torch_compile(unet: torch.nn.Module, m: ModelConfig) -> torch.nn.Module:
    """The UNet as model.use_torch_compile asks: unchanged (false), wrapped whole (true), or with its repeated
    blocks compiled in place ("regional"). Compiling is lazy: the first forward passes compile, and are logged."""
    if not m.use_torch_compile:
        return unet
    use_cache_dir(m.torch_compile_cache_dir)
    CLOCK.restart()
    if m.use_torch_compile != "regional":
        return compile_unet(unet, m.torch_compile_kwargs)
    compiled = compile_regions(plain_module(unet), m.torch_compile_kwargs)
    log.info("torch.compile (regional): %d repeated blocks (%s) with %s; the first steps compile them",
             len(compiled), ", ".join(sorted({type(b).__name__ for b in compiled})),
             describe_kwargs(regional_kwargs(m.torch_compile_kwargs)))
    return unet


def regional_kwargs(kwargs: dict) -> dict:
    """torch.compile's arguments for each block: dynamic shapes unless the config says otherwise."""
    return {"dynamic": True, **kwargs}


def describe_kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "default settings"


def compile_regions(unet: torch.nn.Module, kwargs: dict) -> list[torch.nn.Module]:
    """Compile the UNet's repeated blocks in place (nn.Module.compile); the compiled blocks, in module order."""
    kwargs = regional_kwargs(kwargs)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    unet.compile_repeated_blocks(**kwargs)  # diffusers: every module whose class is in unet._repeated_blocks
    for block in unet.modules():
        if type(block).__name__ in REGIONAL_BLOCKS and block._compiled_call_impl is None:
            block.compile(**kwargs)
    return [b for b in unet.modules() if b._compiled_call_impl is not None]


def use_cache_dir(folder: str) -> None:
    """Point inductor's cache (graphs, kernels, autotuning) at `folder`, so a restart finds what it compiled."""
    if not folder:
        log.info("inductor cache: torch's default folder (model.torch_compile_cache_dir is \"\")")
        return
    path = Path(folder).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only disk: the key, not a traceback
        raise ConfigError(f"model.torch_compile_cache_dir: {folder!r} cannot be made ({e.strerror or e}); give a "
                          f"writable folder, or \"\" for torch's default") from e
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if previous and Path(previous).expanduser().resolve() != path:
        log.warning("model.torch_compile_cache_dir %s replaces TORCHINDUCTOR_CACHE_DIR=%s for this run", path,
                    previous)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor at each compile
    log.info("inductor cache: %s (a restart reuses the graphs and kernels compiled there)", path)


class CompileClock:
    """Logs every compile (dynamo's start and end callbacks: forward graphs, and backward graphs when they are
    compiled) with its time and the total so far; a new bucket shape that compiles again shows up here."""

    def __init__(self) -> None:
        self.count, self.total_s, self.started = 0, 0.0, None

    def restart(self) -> None:
        from torch._dynamo.callback import callback_handler

        self.count, self.total_s = 0, 0.0
        if self.on_start not in callback_handler.start_callbacks:  # torch._dynamo.reset() clears them
            callback_handler.register_start_callback(self.on_start)
            callback_handler.register_end_callback(self.on_end)

    def on_start(self, args) -> None:
        self.started = time.perf_counter()

    def on_end(self, args) -> None:
        if self.started is None:
            return
        took, self.started = time.perf_counter() - self.started, None
        self.count += 1
        self.total_s += took
        log.info("torch.compile: compile %d (%s) took %.1f s, %.1f s in all so far", self.count,
                 args.callback_trigger.name.lower(), took, self.total_s)


CLOCK = CompileClock()
