"""Convert a Diffusers SDXL folder into one checkpoint for ComfyUI, A1111 and Forge.

    python converttosdxl.py --model_path .output/my_run --checkpoint_path my_run.safetensors [--half]

Accepts the arguments of diffusers' classic `convert_diffusers_to_original_sdxl.py`
(`--model_path`, `--checkpoint_path`, `--half`, `--use_safetensors`). The format follows
`--use_safetensors` / `--no-safetensors`, else the file extension (`.ckpt` -> pickle); a suffix
that ComfyUI/A1111 would read as the other format is refused. The output must lie outside the model
folder, and an existing file is replaced only with `--overwrite` (atomically: a temporary name in
the same folder, then a rename). The mapping itself lives in sdxl_ff/export/single_file.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # converting never needs the network

from sdxl_ff.config.schema import CHECKPOINT_SUFFIXES  # noqa: E402
from sdxl_ff.export.single_file import convert_folder
from sdxl_ff.model.weight_check import ExportError
from sdxl_ff.runtime.console import quiet_loggers  # noqa: E402
from sdxl_ff.runtime.pause import pause_point  # noqa: E402


def checkpoint_format(path: Path, use_safetensors: bool | None) -> bool:
    """True for safetensors: the flag's format, else the suffix's; a suffix the loaders would misread is refused."""
    suffix = path.suffix.lower()
    by_suffix = next((fmt for fmt, suffixes in CHECKPOINT_SUFFIXES.items() if suffix in suffixes), None)
    if use_safetensors is None:
        if by_suffix is None:
            what = f"the suffix {suffix}" if suffix else "a name without a suffix"
            raise ExportError(f"--checkpoint_path {path}: {what} names no checkpoint format; end it in .safetensors "
                              f"(or .ckpt with --no-safetensors)")
        return by_suffix == "safetensors"
    wanted = "safetensors" if use_safetensors else "pickle"
    if by_suffix != wanted:
        flag = "--use_safetensors" if use_safetensors else "--no-safetensors"
        read_as = f"read as {by_suffix}" if by_suffix else "not loaded"
        raise ExportError(f"--checkpoint_path {path}: {flag} writes a {wanted} file, but a file ending in "
                          f"{suffix or '(no suffix)'} is {read_as} by ComfyUI and A1111; end it in "
                          f"{' or '.join(CHECKPOINT_SUFFIXES[wanted])}")
    return use_safetensors


def check_checkpoint_path(path: Path, model_path: Path, use_safetensors: bool | None, overwrite: bool = False) -> bool:
    """The format to write (True: safetensors); raise ExportError unless a file of it belongs at `path` and can be
    written there (checked before any conversion work)."""
    if path.is_dir():
        raise ExportError(f"--checkpoint_path {path} is a folder; give a file name, e.g. {path / 'model.safetensors'}")
    use_safetensors = checkpoint_format(path, use_safetensors)
    if path.resolve().is_relative_to(model_path.resolve()):
        raise ExportError(f"--checkpoint_path {path} lies inside the model folder being converted ({model_path}), "
                          f"where it would replace or add to the model's own files; write it outside, e.g. "
                          f"{model_path.resolve().parent / (model_path.resolve().name + path.suffix)}")
    if path.exists() and not overwrite:
        raise ExportError(f"--checkpoint_path {path} already exists; pass --overwrite to replace it, or choose "
                          f"another name")
    folder = path.parent
    if not folder.is_dir():
        raise ExportError(f"--checkpoint_path {path}: the folder {folder} does not exist; create it first")
    try:  # the file is written to a temporary name beside it and renamed: the folder must take new files
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as e:
        raise ExportError(f"--checkpoint_path {path}: cannot create files in {folder} ({e.strerror}); "
                          f"choose a writable folder") from None
    probe.close()
    return use_safetensors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", "--model-path", required=True, help="the Diffusers SDXL folder to read")
    p.add_argument("--checkpoint_path", "--checkpoint-path", required=True, help="the single file to write")
    p.add_argument("--half", action="store_true", help="store floating-point weights as fp16")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--use_safetensors", "--use-safetensors", dest="use_safetensors", action="store_true",
                     default=None, help="write .safetensors (the default unless the path ends in .ckpt)")
    fmt.add_argument("--no-safetensors", "--no_safetensors", dest="use_safetensors", action="store_false",
                     help="write a pickled .ckpt ({'state_dict': ...})")
    p.add_argument("--allow-overflow", "--allow_overflow", dest="allow_overflow", action="store_true",
                   help="with --half, write values beyond fp16's range as inf (with a warning) instead of refusing")
    p.add_argument("--overwrite", action="store_true", help="replace --checkpoint_path if it exists")
    p.add_argument("--variant", default=None, help="read this weight variant (e.g. fp16); "
                                                   "default: plain weights, else the fp16 variant")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    quiet_loggers()
    try:
        use_safetensors = check_checkpoint_path(Path(args.checkpoint_path), Path(args.model_path),
                                                args.use_safetensors, args.overwrite)
        pause_point("convert")  # nothing written yet; tests hold the converter here
        convert_folder(args.model_path, args.checkpoint_path, half=args.half,
                       use_safetensors=use_safetensors, variant=args.variant, allow_overflow=args.allow_overflow)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
