"""Sample images during training: the prompts file, the two sampling backends, `run_eval()`, the grid.

`run_eval()` renders each prompt with its own seed into `<out_dir>/<index>_seed<seed>.png` plus
`grid.png`, with every module in eval mode under `torch.inference_mode()`, and afterwards puts back
exactly what training had: train flags, requires_grad, gradient checkpointing, devices and all RNG
state, so a run with evals trains identically to one without. The VAE and text encoders that the caches
parked on the CPU come to the UNet's device for the eval only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl_ff.config import sampler_names
from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import EvalConfig
from sdxl_ff.eval.backends import EvalPrompt, Progress, decode, sample_diffusers, sample_kdiffusion
from sdxl_ff.model.parts import SDXLParts
from sdxl_ff.runtime.files import replace_dir_atomic
from sdxl_ff.runtime.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)
SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
PROMPT_KEYS = {"prompt", "negative_prompt", "seed", "height", "width", "resolution", "size"}


# --------------------------------------------------------------------------- prompts file

def _entry(index: int, raw: object, height: int, width: int) -> EvalPrompt:
    """One prompts-file entry; raises ValueError naming the problem."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object like {{\"prompt\": \"...\", \"seed\": 1}}, got {json.dumps(raw)}")
    unknown = sorted(set(raw) - PROMPT_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(PROMPT_KEYS))}")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("\"prompt\" must be a non-empty string")
    negative = raw.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise ValueError(f"\"negative_prompt\" must be a string, got {json.dumps(negative)}")
    seed = raw.get("seed", index)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"\"seed\" must be an integer >= 0, got {json.dumps(seed)}")
    for key in ("resolution", "size"):
        if key in raw:
            match = SIZE_PATTERN.match(str(raw[key]))
            if not match:
                raise ValueError(f"\"{key}\" must look like \"1024x640\" (width x height), got {json.dumps(raw[key])}")
            width, height = int(match.group(1)), int(match.group(2))
    height, width = raw.get("height", height), raw.get("width", width)
    for key, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 64 or value % 8:
            raise ValueError(f"\"{key}\" must be an integer >= 64 divisible by 8, got {json.dumps(value)}")
    return EvalPrompt(index, prompt, negative, seed, height, width)


def load_prompts(path: str | Path, height: int, width: int) -> list[EvalPrompt]:
    """Read and check the prompts file; every problem names the entry index. Raises ConfigError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))  # editors on Windows may add a BOM
    except FileNotFoundError:
        raise ConfigError(f"eval.prompts_path: {path} not found; see data/eval_prompts.example.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"eval.prompts_path: {path} is not valid JSON (line {e.lineno}, column {e.colno}): "
                          f"{e.msg}") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"eval.prompts_path: {path} must hold a non-empty JSON list of prompt objects")
    errors, prompts = [], []
    for index, item in enumerate(raw):
        try:
            prompts.append(_entry(index, item, height, width))
        except ValueError as e:
            errors.append(f"entry {index}: {e}")
    if errors:
        raise ConfigError(f"eval.prompts_path: {path}: " + "; ".join(errors))
    return prompts


# --------------------------------------------------------------------------- training state

@contextlib.contextmanager
def parked_on(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """`modules` on `device` inside; after, every parameter and buffer is again the tensor it was before.

    The caches park the VAE and the text encoders on the CPU; eval needs them beside the UNet. Their
    weights do not change inside, so the originals are kept and put back: exact, and no copy back.
    """
    registered = [(sub, name, t, t.data) for module in modules for sub in module.modules()
                  for name, t in (*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False))]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for sub, name, original, data in registered:
            original.data = data  # Module.to may have moved this Parameter's data (CPU <-> CUDA) ...
            setattr(sub, name, original)  # ... or registered a new Parameter/buffer in its place


@contextlib.contextmanager
def inference_state(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Eval mode + inference_mode inside; train flags, requires_grad, checkpointing, devices, RNG restored after."""
    subs = [m for module in modules for m in module.modules()]
    training = [m.training for m in subs]
    checkpointing = [getattr(m, "gradient_checkpointing", None) for m in subs]
    params = [p for module in modules for p in module.parameters()]
    requires_grad = [p.requires_grad for p in params]
    devices = [p.device for p in params]
    rng = rng_state()
    try:
        for module in modules:
            module.eval()
        with torch.inference_mode():
            yield
    finally:
        set_rng_state(rng)
        for m, was_training, ckpt in zip(subs, training, checkpointing, strict=True):
            m.training = was_training
            if ckpt is not None:
                m.gradient_checkpointing = ckpt
        for p, flag, device in zip(params, requires_grad, devices, strict=True):
            p.requires_grad_(flag)
            if p.device != device:  # only if something moved it; .data keeps the Parameter object
                p.data = p.data.to(device)


# --------------------------------------------------------------------------- sampling

def describe_names(cfg: EvalConfig) -> str:
    """"sampler X, scheduler Y" as run, saying when eval.scheduler was a shortcut."""
    sampler, schedule = sampler_names.resolve_shortcut(cfg.sampler_name, cfg.scheduler)
    shortcut = f" (shortcut eval.scheduler={cfg.scheduler})" if schedule != cfg.scheduler else ""
    return f"sampler {sampler}, scheduler {schedule}{shortcut}"


def to_pil(image: np.ndarray) -> Image.Image:
    if not np.isfinite(image).all():
        log.warning("eval: the sampler produced non-finite values (NaN/Inf); they are shown black")
    return Image.fromarray((np.nan_to_num(image) * 255).round().astype(np.uint8))


def make_grid(images: list[Image.Image]) -> Image.Image:
    """Images in a near-square grid; cells are as large as the largest image (sizes may differ per prompt)."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h))
    for n, image in enumerate(images):
        grid.paste(image, ((n % columns) * cell_w, (n // columns) * cell_h))
    return grid


def render_image(parts: SDXLParts, cfg: EvalConfig, prompt: EvalPrompt,
                 progress: Progress | None = None) -> Image.Image:
    """One prompt's image on cfg.backend (eval and sample.py alike); the caller sets eval/inference mode."""
    if cfg.backend == "kdiffusion":
        return to_pil(decode(parts.vae, sample_kdiffusion(parts, cfg, prompt, progress)))
    return to_pil(sample_diffusers(parts, cfg, prompt, progress))


@dataclass
class EvalResult:
    out_dir: Path
    paths: list[Path]
    grid: Image.Image


def run_eval(parts: SDXLParts, cfg: EvalConfig, prompts: list[EvalPrompt], out_dir: str | Path,
             weights: contextlib.AbstractContextManager | None = None,
             autocast: contextlib.AbstractContextManager | None = None) -> EvalResult:
    """Render `prompts` into `out_dir` (replaced atomically); `weights` may swap EMA weights in meanwhile.

    `parts` holds the unwrapped modules; the training state is restored exactly afterwards.
    """
    helpers = [parts.vae, parts.text_encoder, parts.text_encoder_2]  # the caches may have parked them on the CPU
    # parked_on is outermost: its moves happen outside inference_mode, so no weight becomes an inference tensor
    with (parked_on(helpers, parts.unet.device), inference_state([parts.unet, *helpers]),
          weights or contextlib.nullcontext(), autocast or contextlib.nullcontext()):
        images = [render_image(parts, cfg, prompt) for prompt in prompts]
    out_dir = Path(out_dir)
    grid = make_grid(images)
    with replace_dir_atomic(out_dir) as tmp:
        for prompt, image in zip(prompts, images, strict=True):
            image.save(tmp / prompt.file_name)
        grid.save(tmp / "grid.png")
    return EvalResult(out_dir, [out_dir / p.file_name for p in prompts], grid)
