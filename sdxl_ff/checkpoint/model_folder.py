"""Writing a trained model: the Diffusers folder with its config and trainer state, atomically.

Used for checkpoints and for the final output; the final save swaps the EMA weights in when
`model.use_ema` is on, and frozen modules are written exactly as they were loaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from sdxl_ff.checkpoint.checkpointer import SHARDS_NAME, STATE_NAME, Checkpointer, SaveError, resume_command
from sdxl_ff.config.errors import AnomalyError, ConfigError
from sdxl_ff.config.load import to_dict
from sdxl_ff.config.schema import Config
from sdxl_ff.model import parts as models
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.optim.ema import EMA
from sdxl_ff.runtime.files import (
    FolderKept,
    error_cause,
    give_default_modes,
    link_problem,
    replace_dir_atomic,
    save_torch_atomic,
    unused_name,
    write_problem,
)

log = logging.getLogger("sdxl_ff")

# where a final model that cannot be written into its output folder goes instead (default: the temporary folder)
RESCUE_ENV = "SDXL_FF_RESCUE_DIR"


def check_output_folders(cfg: Config, accelerator=None) -> None:
    """Every folder this run will write to can take files: found at start-up, not after hours of training.

    With several processes only the main one probes (they would trip over each other's mkdir/rmdir of
    the same folders); the others wait for it.
    """
    if accelerator is not None and accelerator.num_processes > 1:
        if accelerator.is_main_process:
            check_output_folders(cfg)
        accelerator.wait_for_everyone()
        return
    t, d = cfg.training, cfg.data
    folders = {"training.output_dir": t.output_dir, "training.state_path": str(Path(t.state_path).parent)}
    if cfg.export.save_single_file:
        folders["export.checkpoint_path"] = str(Path(cfg.export.checkpoint_path).parent)
    if t.tensorboard.enabled:
        folders["training.tensorboard.log_dir"] = t.tensorboard.log_dir
    if d.latent_cache.enabled:
        folders["data.latent_cache.cache_dir"] = d.latent_cache.cache_dir
    if d.text_embedding_cache.enabled:
        folders["data.text_embedding_cache.cache_dir"] = d.text_embedding_cache.cache_dir
    first_key = {}
    for key, folder in folders.items():
        first_key.setdefault(str(Path(folder).absolute()), key)  # state_path usually lies in output_dir
    # a cache folder that holds entries may be a complete read-only cache: whether anything must be written to it
    # is known when its entries are (latent_cache.check_can_write)
    caches = {"data.latent_cache.cache_dir", "data.text_embedding_cache.cache_dir"}
    problems = [f"{key}: cannot write to {folder}: {problem}" for folder, key in first_key.items()
                if (problem := write_problem(folder)) and not (key in caches and _holds_files(folder))]
    if problems:
        raise ConfigError("; ".join(problems) + ". Choose a folder you can write to (run.output_root sets "
                                                "the output folders)")
    check_final_save(Path(t.output_dir))


def check_final_save(output_dir: Path) -> None:
    """What the final save needs of the folder it replaces, found at start-up: it carries every entry already there
    into the new folder as a hard link; a symlink stays a symlink, and what cannot be linked (another filesystem,
    no hard links there) is copied: logged here with its size."""
    if not output_dir.is_dir():
        return
    home = output_dir.parent.stat().st_dev
    files = list(_files_below(output_dir))
    problem = link_problem(output_dir.parent)
    to_copy = files if problem else [f for f in files if f.lstat().st_dev != home]
    if to_copy:
        why = problem or "on another filesystem than the output folder"
        log.info("final save: %d file(s) in %s (%.1f MB, e.g. %s) cannot be hard-linked into the new folder (%s); "
                 "they will be copied", len(to_copy), output_dir, sum(f.lstat().st_size for f in to_copy) / 2**20,
                 to_copy[0], why)


def check_room_for_final_save(cfg: Config, parts: models.SDXLParts) -> None:
    """Refuse at start-up a disk that cannot hold even the final model's weights (a lower bound of the save:
    the trainer state and checkpoints come on top): it would fail after the last step."""
    folder = Path(cfg.training.output_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    weights = weight_bytes(parts)
    free = shutil.disk_usage(folder).free
    if free < weights:
        raise ConfigError(f"training.output_dir: {cfg.training.output_dir} has {free / 2**20:.1f} MB free, but the "
                          f"final save alone needs at least {weights / 2**20:.1f} MB (the model's weights; its "
                          f"trainer state and any checkpoints come on top): free space there, or choose another "
                          f"run.output_root")


def weight_bytes(parts: models.SDXLParts) -> int:
    """The bytes of the model's weights (every parameter and buffer of the four saved modules)."""
    return sum(tensor_bytes([*getattr(parts, name).parameters(), *getattr(parts, name).buffers()])
               for name in ("unet", "vae", "text_encoder", "text_encoder_2"))


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in `obj` (a tensor, or dicts, lists and tuples of them, as a trainer state is)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def _files_below(folder: Path) -> Iterator[Path]:
    """The files below `folder`, not following symlinks (the final save carries a symlink as a symlink)."""
    for root, _, names in os.walk(folder):  # it never descends into a symlinked folder
        yield from (Path(root, name) for name in names if not os.path.islink(os.path.join(root, name)))


def _holds_files(folder: str) -> bool:
    return Path(folder).is_dir() and any(Path(folder).iterdir())


def check_fresh_output(cfg: Config, overwrite: bool = False) -> None:
    """A fresh run must not silently replace an earlier run's model (or single file) and mix in its checkpoints."""
    single_file = Path(cfg.export.checkpoint_path)
    if cfg.export.save_single_file and single_file.is_file():
        if not overwrite:
            raise ConfigError(f"export.checkpoint_path: {single_file} already exists (an earlier run's single file); "
                              f"this run would replace it when it finishes: choose another run.name or "
                              f"export.checkpoint_path, move the file away, or pass --overwrite")
        log.warning("--overwrite: this run replaces %s when it finishes", single_file)
    output_dir = Path(cfg.training.output_dir)
    checkpoints = Checkpointer(output_dir, None).existing()
    states = {p for p in (output_dir / STATE_NAME, Path(cfg.training.state_path)) if p.is_file()}
    earlier = sorted(states) + checkpoints
    if not earlier:
        return
    found = f"{earlier[0]}{f' and {len(earlier) - 1} more' if len(earlier) > 1 else ''}"
    if overwrite:
        log.warning("--overwrite: %s holds an earlier run (%s); this run replaces its model when it finishes, and "
                    "its checkpoints count toward training.keep_checkpoints", output_dir, found)
        return
    finished = (output_dir / "model_index.json").is_file() and bool(states)  # the final save comes last
    if finished:
        hint = f"it finished; to train it further, resume it with a larger total: {train_further_command(cfg)}; "
    else:
        hint = f"to continue it: {resume_command(cfg, checkpoints[-1])}; " if checkpoints else ""
    raise ConfigError(f"training.output_dir: {output_dir} already holds an earlier run ({found}). A fresh run would "
                      f"replace its model and prune among its checkpoints. {hint}to start a new one, choose another "
                      f"run.name (--set run.name=...), delete {output_dir}, or pass --overwrite")


def train_further_command(cfg: Config, folder: Path | None = None, state_in_folder: bool = False) -> str:
    """The command that resumes a finished run in `folder` (default training.output_dir) with twice its steps
    (or epochs).

    num_steps/num_epochs count the whole run, so the same values would be refused (nothing left to train).
    The finished run's own values come from its saved config; this run's stand in when it has none.
    `state_in_folder`: the trainer state lies in `folder` even where training.state_path is elsewhere (a rescue).
    """
    output_dir = Path(cfg.training.output_dir)
    folder = Path(folder or output_dir)
    try:
        earlier = json.loads((folder / "sdxl_ff_config.json").read_text(encoding="utf-8"))["training"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = {"num_steps": cfg.training.num_steps, "num_epochs": cfg.training.num_epochs}
    more = [f"training.{key}={json.dumps(2 * earlier[key])}" for key in ("num_steps", "num_epochs")
            if earlier.get(key)]
    if not state_in_folder and Path(cfg.training.state_path).absolute() != (output_dir / STATE_NAME).absolute():
        more.append(f"training.resume_state_path={cfg.training.state_path}")
    return resume_command(cfg, folder, *more)


def write_model_folder(folder: Path, cfg: Config, parts: models.SDXLParts, trainables: Trainables, accelerator,
                       state: dict, state_name: str | None = STATE_NAME, shards: Path | None = None) -> None:
    """Fill `folder` with the Diffusers pipeline, the resolved config and (optionally) the trainer state;
    `shards`: the staged DCP folder of a sharded run (parallel/fsdp2_state.py), moved in as sharded_state/."""
    # the weights as written (the EMA's when swapped in) must be finite, with or without training.detect_anomaly:
    # a saved model (exit 0) or a checkpoint (the "last good state") must be usable
    if bad := non_finite_weights(trainables.modules):
        last = last_good_state(cfg, Checkpointer(cfg.training.output_dir, None))
        raise AnomalyError(non_finite_weights_message(bad, state["global_step"], last))
    # keep_torch_compile=False: saved keys must never carry `_orig_mod.` (sd-scripts #981)
    saved = {name: trainables.for_saving(name, accelerator.unwrap_model(getattr(parts, name),
                                                                        keep_torch_compile=False))
             for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    models.save_pipeline(models.SDXLParts(**{**parts.__dict__, **saved}), folder)
    (folder / "sdxl_ff_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if state_name:
        torch.save(state, folder / state_name)
    if shards is not None:
        shutil.move(shards, folder / SHARDS_NAME)  # a rename, or a copy where `folder` is on another disk (a rescue)
    give_default_modes(folder)


def save_outputs(cfg: Config, parts: models.SDXLParts, trainables: Trainables, accelerator, state: dict,
                 shards: Path | None = None) -> None:
    """Write the final Diffusers folder and trainer_state.pt (and a sharded run's shards); each appears only when
    complete.

    When the model is written but cannot be put in place (carrying the folder's other entries over or the swap
    fails), it is kept complete in a sibling folder that the error names, with the command to go on from it.
    When it cannot be written there at all (a full disk, an I/O error), it is written to a rescue folder on
    another disk (rescue_final_model); the error names the first cause, where the model is and the command.
    """
    output_dir, state_path = Path(cfg.training.output_dir), Path(cfg.training.state_path)
    inside = state_path.parent.resolve() == output_dir.resolve()
    keep_as = output_dir.with_name(f"{output_dir.name}-final-step-{state['global_step']:07d}")
    try:
        with replace_dir_atomic(output_dir, keep_as=keep_as) as tmp:
            write_model_folder(tmp, cfg, parts, trainables, accelerator, state, state_path.name if inside else None,
                               shards=shards)
        if not inside:
            save_torch_atomic(state, state_path)
    except AnomalyError:  # non-finite weights: not a write failure, and the message says where to go on
        raise
    except FolderKept as e:
        more = train_further_command(cfg, e.kept) if inside else ""
        raise SaveError(e.errno, f"could not put the final output in place in {output_dir}: {error_cause(e.cause)}. "
                                 f"The trained model is complete in {e.kept} (a Diffusers folder"
                                 f"{' with its trainer state' if inside else ''}): use it from there"
                                 f"{f', or train it further with: {more}' if more else ''}") from e
    except Exception as e:  # torch and safetensors report I/O failures as their own error types
        failed = f"could not write the final output {output_dir}: {error_cause(e)}"
        code = getattr(e, "errno", None) or errno.EIO
        target = rescue_root() / f"{output_dir.name}-step-{state['global_step']:07d}"
        try:
            rescued = rescue_final_model(target, cfg, parts, trainables, accelerator, state, shards)
        except Exception as r:
            raise SaveError(code, f"{failed}; nor a rescue copy in {target}: {error_cause(r)} (set {RESCUE_ENV} to a "
                                  f"folder with room); {final_save_fallback(cfg)}") from e
        where = f"{RESCUE_ENV} chooses the place" if os.environ.get(RESCUE_ENV) else \
            f"the temporary folder, which a restart may empty: move it; {RESCUE_ENV} chooses the place"
        raise SaveError(code, f"{failed}. The trained model is complete in {rescued} (a Diffusers folder with its "
                              f"trainer state, written there instead; {where}): use it from there, or, once the "
                              f"cause is fixed, train it further with: "
                              f"{train_further_command(cfg, rescued, state_in_folder=True)}") from e
    log.info("saved %s (Diffusers folder) and %s", output_dir, state_path)


def rescue_root() -> Path:
    """Where final models that cannot be written into their output folder go: $SDXL_FF_RESCUE_DIR, else the system's
    temporary folder (usually another disk than the outputs), each in sdxl-ff-rescue/."""
    return Path(os.environ.get(RESCUE_ENV) or tempfile.gettempdir()) / "sdxl-ff-rescue"


def rescue_final_model(target: Path, cfg: Config, parts: models.SDXLParts, trainables: Trainables, accelerator,
                       state: dict, shards: Path | None = None) -> Path:
    """Write the final model with its trainer state to `target` (or the next unused name), atomically; return where.

    A disk without room for the weights and the state is refused before anything is written (a full /tmp fails
    at once, with the sizes, instead of after writing gigabytes)."""
    target = unused_name(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = sum(f.stat().st_size for f in _files_below(shards)) if shards is not None else 0  # a sharded run's
    need = weight_bytes(parts) + tensor_bytes(state) + staged
    free = shutil.disk_usage(target.parent).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device: {free / 2**20:.1f} MB free, the model and its trainer "
                                    f"state need {need / 2**20:.1f} MB", str(target.parent))
    with replace_dir_atomic(target) as tmp:
        write_model_folder(tmp, cfg, parts, trainables, accelerator, state, STATE_NAME, shards=shards)
    log.info("final save: the trained model is in %s", target)
    return target


def final_save_fallback(cfg: Config) -> str:
    """What a failed final save leaves to go on from: the newest checkpoint and the command, or that none exists."""
    output_dir = Path(cfg.training.output_dir)
    newest = [p for p in Checkpointer(output_dir, None).existing() if (p / STATE_NAME).is_file()]
    before = "what was there before is intact"
    if not newest:
        return (f"{before}, but this run wrote no checkpoint (training.checkpoint_every), so its training is lost: "
                f"fix the cause and run it again")
    return (f"{before}, and so is every checkpoint in {output_dir / 'checkpoints'}. Fix the cause, then finish from "
            f"the newest ({newest[-1]}) with: {resume_command(cfg, newest[-1])}")


def save_final(cfg: Config, parts: models.SDXLParts, trainables: Trainables, accelerator, state: dict,
               ema: EMA | None) -> None:
    """The final save; the EMA weights replace the trained ones when model.use_ema is on (seed)."""
    with ema.applied() if ema is not None else contextlib.nullcontext(False) as ema_in_weights:
        if ema is not None:
            log.info("final save: %s", "EMA weights" if ema_in_weights else
                     f"trained weights (the EMA never started: lr_warmup_steps {cfg.training.lr_warmup_steps})")
        ema_state = ema.state_dict() if ema is not None else None  # read while swapped: no 2nd copy in memory
        save_outputs(cfg, parts, trainables, accelerator,
                     {**state, "ema": ema_state, "ema_in_weights": bool(ema_in_weights)})


def last_good_state(cfg: Config, checkpointer: Checkpointer) -> str | None:
    """The newest trainer state on disk that a stopped run can go back to."""
    candidates = [p / STATE_NAME for p in reversed(checkpointer.existing())] + [Path(cfg.training.state_path)]
    return next((str(p) for p in candidates if p.is_file()), None)


def interrupted_hint(cfg: Config) -> str:
    """What a Ctrl-C outside the training loop (loading, cache building, a second Ctrl-C) left to go on from."""
    newest = [p for p in Checkpointer(cfg.training.output_dir, None).existing() if (p / STATE_NAME).is_file()]
    caches = [c.cache_dir for c in (cfg.data.latent_cache, cfg.data.text_embedding_cache) if c.enabled]
    hint = f"; the cache entries already written in {' and '.join(caches)} are kept" if caches else ""
    if newest:
        return f"{hint}; the newest checkpoint is {newest[-1]}. Resume with:\n  {resume_command(cfg, newest[-1])}"
    return f"{hint}; no checkpoint of this run exists yet: run the same command again to start over"


def non_finite_weights(modules: dict[str, torch.nn.Module]) -> list[str]:
    """Names ('unet.conv_in.weight', ...) of the parameters holding NaN or an infinity.

    Each tensor's fp32 sum screens it (one reduction, no temporary the size of the tensor, one host sync
    per device): any NaN or Inf makes the sum non-finite. A sum can also overflow with finite values, so
    only the tensors it flags get the exact element-wise test. Runs whether or not training.detect_anomaly
    watched every step; benchmarks/bench_save_check.py compares its cost with the save's.
    """
    named = [(f"{module_name}.{name}", p.detach()) for module_name, module in modules.items()
             for name, p in module.named_parameters()]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, p in named:
        by_device.setdefault(p.device, []).append((name, p))
    flagged = []
    for group in by_device.values():
        sums = torch.stack([p.sum(dtype=torch.float32) for _, p in group])
        flagged += [pair for pair, ok in zip(group, torch.isfinite(sums).tolist(), strict=True) if not ok]
    bad = {name for name, p in flagged if not torch.isfinite(p).all()}
    return [name for name, _ in named if name in bad]


def non_finite_weights_message(bad: list[str], step: int, last_state: str | None) -> str:
    """Why a save (checkpoint or final model) was refused, and where to go on from."""
    saved = (f"the last good state is {last_state} (left untouched): resume from its folder with a lower learning "
             f"rate or training.max_grad_norm" if last_state else
             "no earlier state of this run exists: start again with a lower learning rate or training.max_grad_norm")
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return (f"the trained weights hold NaN or infinite values at step {step} ({len(bad)} tensor(s): {shown}); "
            f"they were not saved (neither as a checkpoint nor as the model); {saved}. "
            f"training.detect_anomaly=true stops at the first non-finite loss and names its batch")
