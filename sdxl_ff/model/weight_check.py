"""Whether a Diffusers component folder's weights match its config.json: names and shapes, nothing else.

One check for the converter (export.py, on the tensors it read) and the trainer's loading (models.py, on
the file headers, when a library reports a problem): a folder whose weights were replaced by another
model's, or only partly written, is named with a few of its mismatched tensors instead of crashing later
on meta tensors or silently training freshly initialised ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl_ff.model.architecture import derived_shapes

SHOWN = 5  # tensors named per kind of problem


def architecture_shapes(component: str, folder: Path) -> dict[str, tuple[int, ...]]:
    """Every weight name and shape the component's config.json calls for: read off the config (architecture.py),
    else built on the meta device."""
    if (derived := derived_shapes(component, folder)) is not None:
        return derived
    return built_shapes(component, folder)


def built_shapes(component: str, folder: Path) -> dict[str, tuple[int, ...]]:
    """The component built from its config.json on the meta device: its state dict's names and shapes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        if component in ("unet", "vae"):
            cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
            model = cls.from_config(cls.load_config(folder))
        else:
            cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
            model = cls(CLIPTextConfig.from_pretrained(folder))
    return {key.removeprefix("text_model."): tuple(v.shape) for key, v in model.state_dict().items()}


def header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of weight files, read from safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        else:  # a pickled .bin: mapped, not read
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({key: tuple(value.shape) for key, value in state.items()})
    return shapes


def shape_problems(component: str, folder: Path, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What differs between the weights' names and shapes and what `folder`/config.json calls for (a few of each)."""
    expected = architecture_shapes(component, folder)
    got = {k.removeprefix("text_model."): tuple(s) for k, s in shapes.items()
           if not k.endswith("embeddings.position_ids")}
    problems = [f"missing {k}" for k in sorted(expected.keys() - got.keys())][:SHOWN]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - expected.keys())][:SHOWN]
    problems += [f"{k} has shape {list(got[k])}, config wants {list(s)}"
                 for k, s in sorted(expected.items()) if k in got and got[k] != s][:SHOWN]
    return problems


def mismatch_message(folder: Path, problems: list[str]) -> str:
    return f"{folder}: the weights do not match {folder / 'config.json'}: {'; '.join(problems)}"


PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "text_encoder": "conditioner.embedders.0.transformer.text_model.",
          "text_encoder_2": "conditioner.embedders.1.model."}


class ExportError(ValueError):
    """The input cannot be converted faithfully; the message names the file or key and the remedy."""


WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The files holding a component's weights: one file or all shards, plain or `.fp16` variant."""
    variants = [variant] if variant else [None, "fp16"]
    for var in variants:
        dot = f".{var}" if var else ""
        for stem in WEIGHT_STEMS:
            for ext in ("safetensors", "bin"):
                single = folder / f"{stem}{dot}.{ext}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}.{ext}.index{dot}.json"
                if index.is_file():
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    absent = [s for s in shards if not (folder / s).is_file()]
                    if absent:
                        raise ExportError(f"{index} lists shards that are missing: {', '.join(absent)}; "
                                          f"the save was interrupted, save the model again")
                    return [folder / s for s in shards]
    wanted = f"variant {variant!r}" if variant else "plain or fp16"
    raise ExportError(f"{folder}: no weights found ({wanted} *.safetensors or *.bin); save the model again")
