"""sample.py's command line: its options, the checks that need no model, and the command the trainer prints.

No torch here: a misspelt name, a bad size or a missing path is answered before the heavy imports (seconds).
The defaults are the trainer's eval defaults (EvalConfig), and the names are checked by the same function as
eval.sampler_name / eval.scheduler, so `sample.py` and `eval.*` draw the same image for the same settings.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from sdxl_ff.config.errors import UserError
from sdxl_ff.config.sampler_names import eval_name_errors
from sdxl_ff.config.schema import EvalConfig

SCRIPT = Path(__file__).resolve().parents[2] / "sample.py"
DEFAULTS = EvalConfig()
SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")
# the trainer's checks name config keys; sample.py's user knows these options instead
CLI_NAMES = {"eval.sampler_name": "--sampler", "eval.scheduler": "--scheduler", "eval.backend": "--backend",
             "eval.prompts_path": "--prompts", "model.config_dir": "--config-dir", "model.id": "--model"}
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt")  # models.SINGLE_FILE_SUFFIXES (that module imports torch)
DEFAULT_FILE, DEFAULT_FOLDER = "sample.png", "samples"
# option -> EvalConfig field, for the options the trainer's "next:" command repeats when the run's eval differs
EVAL_OPTIONS = (("--backend", "backend"), ("--sampler", "sampler_name"), ("--scheduler", "scheduler"),
                ("--steps", "num_inference_steps"), ("--cfg", "cfg_scale"), ("--empty-negative", "empty_negative"))


class SampleError(UserError):
    """A bad option or path given to sample.py: one line, exit code 2."""


def in_cli_words(message: str) -> str:
    """A message of the trainer's own checks, with its config keys named as sample.py's options."""
    return re.sub("|".join(map(re.escape, CLI_NAMES)), lambda m: CLI_NAMES[m.group(0)], message)


@dataclass
class SampleRequest:
    """What to draw, from which model, into which file(s): the checked command line."""
    model: str
    config_dir: str | None
    eval: EvalConfig
    prompt: str | None  # one prompt, or ...
    prompts_file: str | None  # ... the entries of an eval prompts file
    negative: str
    seed: int
    out: Path
    out_is_file: bool
    overwrite: bool
    use_ema: bool
    device: str
    precision: str | None  # None: the run's own (as its eval images were drawn)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage too; one line says it
        raise SampleError(f"{message} (see python sample.py --help)")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = OneLineParser(prog="sample.py", description="Render images from a trained SDXL with the trainer's own eval "
                                                    "samplers: ComfyUI's image for the same settings.")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="a training output folder, a checkpoint (<output_dir>/checkpoints/step-N), any Diffusers SDXL "
                        "folder, a single-file .safetensors/.ckpt (with --config-dir), builtin:tiny-sdxl or a hub id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to draw")
    what.add_argument("--prompts", metavar="FILE", help="a JSON prompts file as eval.prompts_path takes it (prompt, "
                                                        "negative_prompt, seed, size per entry); one image each")
    p.add_argument("--negative", help="the negative prompt (default: none)")
    p.add_argument("--seed", type=int, help="the noise seed (default 0)")
    p.add_argument("--size", metavar="WxH", help=f"WIDTHxHEIGHT, or one number for a square (default "
                                                  f"{d.width}x{d.height}); with --prompts: for entries without one")
    p.add_argument("--sampler", default=d.sampler_name, help=f"a ComfyUI sampler name (default {d.sampler_name})")
    p.add_argument("--scheduler", default=d.scheduler, help=f"a ComfyUI scheduler name (default {d.scheduler})")
    p.add_argument("--steps", type=int, default=d.num_inference_steps,
                   help=f"sampling steps (default {d.num_inference_steps})")
    p.add_argument("--cfg", type=float, default=d.cfg_scale, help=f"guidance scale (default {d.cfg_scale:g})")
    p.add_argument("--backend", choices=("diffusers", "kdiffusion"), default=d.backend,
                   help=f"the sampling code, as eval.backend (default {d.backend})")
    p.add_argument("--empty-negative", choices=("zeros", "encoded"),
                   help="an empty negative prompt as zeros or as encoded \"\" (ComfyUI's); default: the backend's")
    p.add_argument("--out", help=f"a .png path for one image, or a folder (default: {DEFAULT_FILE}; "
                                 f"{DEFAULT_FOLDER}/ with --prompts)")
    p.add_argument("--overwrite", action="store_true", help="replace existing images")
    p.add_argument("--no-ema", action="store_true", help="the trained weights, not the EMA beside them")
    p.add_argument("--config-dir", metavar="DIR", help="with a single-file checkpoint: a Diffusers SDXL folder with "
                                                       "the configs and tokenizers (as model.config_dir)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: a GPU when there is one")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="default: the run's, as its eval images were drawn (model.use_bf16: bf16 autocast; "
                        "else fp32 on the CPU, fp16 autocast on a GPU)")
    return p


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) from "1024x768" or "1024"; both >= 64 and divisible by 8."""
    match = SIZE.match(text)
    if not match:
        raise SampleError(f"--size: {text!r} is not a size; give WIDTHxHEIGHT (e.g. 1024x768) or one number "
                          f"for a square (e.g. 1024)")
    width, height = int(match.group(1)), int(match.group(2) or match.group(1))
    for name, value in (("width", width), ("height", height)):
        if value < 64 or value % 8:
            raise SampleError(f"--size: {text!r}: the {name} {value} must be at least 64 and divisible by 8 "
                              f"(the VAE halves the image 3 times); e.g. {max(64, value // 8 * 8)}")
    return width, height


def check_model(model: str, config_dir: str | None) -> None:
    """A --model path that is not there, or a folder that holds no model, named before anything loads."""
    path = Path(model).expanduser()
    if config_dir is not None and not Path(config_dir).expanduser().is_dir():
        raise SampleError(f"--config-dir: {config_dir} is not a folder; give a Diffusers SDXL folder (the "
                          f"training output folder, or SDXL base's configs and tokenizers)")
    if path.is_dir():
        if config_dir is not None:
            raise SampleError(f"--config-dir goes with a single-file checkpoint; --model {model} is a folder, "
                              f"which has its own configs: leave --config-dir out")
        if not (path / "model_index.json").is_file():
            inside = sorted(str(p.parent) for p in path.glob("*/model_index.json"))[:3]  # e.g. .output/<run>
            hint = f"did you mean {' or '.join(inside)}?" if inside else \
                "give a training output folder or a checkpoint (<output_dir>/checkpoints/step-N)"
            raise SampleError(f"--model: {model} holds no model (no model_index.json); {hint}")
    elif not path.exists():
        first = Path(model.split("/")[0]).expanduser()
        looks_local = model.startswith((".", "/", "~")) or path.suffix in MODEL_FILE_SUFFIXES or \
            ("/" in model and first.exists())  # "org/name" without such a folder may be a hub id
        if looks_local and not model.startswith("builtin:"):
            raise SampleError(f"--model: {model} does not exist; give a training output folder, a checkpoint "
                              f"folder or a single-file checkpoint")


def output_target(out: str | None, several: bool) -> tuple[Path, bool]:
    """(path, is a file): a .png path or a folder; a file path must not already exist as a folder."""
    if out is None:
        return Path(DEFAULT_FOLDER if several else DEFAULT_FILE).absolute(), not several
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        return path, False
    if path.suffix.lower() == ".png":
        if several:
            raise SampleError(f"--out: {out} is one PNG, but --prompts draws one image per entry; give a folder")
        return path, True
    if path.suffix:
        raise SampleError(f"--out: {out}: sample.py writes PNG images; give a .png path or a folder")
    return path, False


def image_paths(target: Path, is_file: bool, names: list[str], overwrite: bool) -> list[Path]:
    """The file of each image (`names`: the eval file names); existing ones only with --overwrite."""
    if is_file and len(names) != 1:
        raise SampleError(f"--out: {target} is one PNG, but the prompts file has {len(names)} entries; give a folder")
    paths = [target] if is_file else [target / name for name in names]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise SampleError(f"--out: {existing[0]}{more} exists; pass --overwrite to replace it, or choose another --out")
    blocked = next((p for p in paths if p.is_dir()), None)
    if blocked is not None:
        raise SampleError(f"--out: {blocked} is a folder; choose another --out")
    folder = next((p for p in [paths[0].parent, *paths[0].parent.parents] if p.exists()), None)
    if folder is not None and (not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK)):
        raise SampleError(f"--out: cannot write below {folder}; choose a folder you can write to")
    return paths


def check(args: argparse.Namespace) -> SampleRequest:
    """The request, or a SampleError naming the option, the value and what is allowed."""
    if args.prompts is not None:
        for flag, value in (("--seed", args.seed), ("--negative", args.negative)):
            if value is not None:
                raise SampleError(f"{flag} goes with --prompt; the prompts file gives each entry its own "
                                  f"(\"seed\", default its index; \"negative_prompt\")")
        if not Path(args.prompts).is_file():
            raise SampleError(f"--prompts: {args.prompts} does not exist; see data/eval_prompts.example.json")
    elif not args.prompt.strip():
        raise SampleError("--prompt is empty; give the text to draw")
    seed = 0 if args.seed is None else args.seed
    if not 0 <= seed < 2**63:
        raise SampleError(f"--seed: {seed} is out of range; allowed: 0 to 2**63 - 1")
    if args.steps < 1:
        raise SampleError(f"--steps: {args.steps}; allowed: 1 or more")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise SampleError(f"--cfg: {args.cfg}; allowed: a finite number >= 0")
    width, height = parse_size(args.size) if args.size is not None else (DEFAULTS.width, DEFAULTS.height)
    errors = eval_name_errors(args.backend, args.sampler, args.scheduler)
    if errors:
        raise SampleError(in_cli_words("; ".join(errors)))
    check_model(args.model, args.config_dir)
    out, out_is_file = output_target(args.out, several=args.prompts is not None)
    cfg = replace(DEFAULTS, backend=args.backend, sampler_name=args.sampler, scheduler=args.scheduler,
                  num_inference_steps=args.steps, cfg_scale=args.cfg, height=height, width=width,
                  empty_negative=args.empty_negative)
    return SampleRequest(args.model, args.config_dir, cfg, args.prompt, args.prompts, args.negative or "", seed,
                         out, out_is_file, args.overwrite, not args.no_ema, args.device, args.precision)


def read_command_line(argv: list[str] | None) -> SampleRequest:
    return check(build_parser().parse_args(argv))


def sample_command(model: str | Path, e: EvalConfig, prompt: str = "a photo") -> str:
    """The sample.py command the trainer prints: the saved model with the run's eval settings where they are not
    the defaults, into <model>/sample.png; runnable as printed from any folder (absolute paths, quoted)."""
    folder = Path(model).absolute()
    args = [sys.executable, str(SCRIPT), "--model", str(folder), "--prompt", prompt]
    for flag, key in EVAL_OPTIONS:
        if getattr(e, key) != getattr(DEFAULTS, key):
            args += [flag, str(getattr(e, key))]  # str() of a float keeps every digit
    if (e.width, e.height) != (DEFAULTS.width, DEFAULTS.height):
        args += ["--size", f"{e.width}x{e.height}"]
    return shlex.join([*args, "--out", str(folder / DEFAULT_FILE)])
