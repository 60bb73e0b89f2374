"""Checkpoints and resume: numbered Diffusers folders with trainer_state.pt, written so a crash never loses one.

A checkpoint is `<output_dir>/checkpoints/step-NNNNNNN/`: the full Diffusers pipeline plus
`trainer_state.pt`. It is built in a temporary folder and renamed into place only when complete,
so the newest complete checkpoint is always loadable. `training.resume_from` accepts such a
folder or a final output folder.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sdxl_ff.config.errors import AnomalyError, UserError
from sdxl_ff.config.load import FORMAT_VERSION
from sdxl_ff.config.schema import Config
from sdxl_ff.optim.optimizers import legacy_optimizer_impl, set_group_lr
from sdxl_ff.runtime.files import describe_write_error, fsync_tree, recover_interrupted_swap
from sdxl_ff.runtime.pause import pause_point

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
SHARDS_NAME = "sharded_state"  # training.sharding "fsdp2": optimizer state and EMA in DCP, one file per process


class ResumeError(UserError, ValueError):
    """The saved state cannot continue this run; the message says what differs and what to do."""


class SaveError(UserError, OSError):
    """Writing a checkpoint or the final output failed; the message says what is intact and where.

    Raised with the errno of the real cause; shown as its message alone (the cause, errno included, is in it).
    """

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# --------------------------------------------------------------------------- fingerprints

def module_signature(module: torch.nn.Module) -> str:
    """A short hash of a module's parameter names and shapes (its architecture, not its values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
    return h.hexdigest()[:16]


def run_fingerprint(modules: dict[str, torch.nn.Module], trained: list[str], optimizer_type: str,
                    optimizer_impl: str) -> dict:
    """What a resumed run must share with the run that wrote the state (the optimizer's implementation too)."""
    return {"architecture": {name: module_signature(m) for name, m in modules.items()},
            "trained": list(trained), "optimizer": optimizer_type, "optimizer_impl": optimizer_impl}


def check_optimizer_impl(saved: dict, current: dict, state_path: str | Path, weights_from: str | Path) -> None:
    """Refuse, in one line, an optimizer state of the same optimizer.type that this run's implementation cannot
    load (e.g. bitsandbytes' AdamW8bit state from before issue 25); the weights beside it still train on."""
    saved_impl = saved.get("optimizer_impl") or legacy_optimizer_impl(saved["optimizer"])
    same_type = saved["optimizer"].split()[0] == current["optimizer"].split()[0]
    if same_type and saved_impl != current["optimizer_impl"]:
        raise ResumeError(f"{state_path}: its optimizer state comes from {saved_impl} and this run steps "
                          f"{current['optimizer_impl']}, which cannot load it; to continue from its weights, start "
                          f"a new run with --set model.id={weights_from} (without training.resume_from)")


def check_compatible(saved: dict, current: dict, state_path: str | Path, weights_from: str | Path = "") -> None:
    """Raise ResumeError naming every difference that makes the state unusable for this run."""
    check_optimizer_impl(saved, current, state_path, weights_from or Path(state_path).parent)
    problems = []
    for name, signature in current["architecture"].items():
        if saved["architecture"].get(name) != signature:
            problems.append(f"the {name} architecture differs (another model than the one the state was "
                            f"trained on)")
    if saved["trained"] != current["trained"]:
        problems.append(f"trained modules differ: the state trained {', '.join(saved['trained'])}, this config "
                        f"trains {', '.join(current['trained'])} (model.train_text_encoder_1/2)")
    if saved["optimizer"] != current["optimizer"]:
        problems.append(f"optimizer differs: the state used {saved['optimizer']}, this config uses "
                        f"{current['optimizer']} (optimizer.type)")
    if problems:
        raise ResumeError(f"cannot resume from {state_path}:\n  - " + "\n  - ".join(problems) +
                          "\nmatch the config to the run that wrote the state, or start a fresh run without "
                          "training.resume_from")


# --------------------------------------------------------------------------- loading

def _state_globals() -> list:
    """The only non-tensor, non-builtin types a trainer state holds: numpy's RNG state (a uint32 ndarray) and
    torchao's 8-bit optimizer state tensor (codes, block scales and the quantisation map: tensors only).

    Named under numpy 1's and numpy 2's module paths, so a state written under either loads under both.
    """
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    from torchao.optim.subclass_8bit import OptimState8bit
    return [(_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, np.dtypes.UInt32DType, OptimState8bit]


def load_state(path: str | Path) -> dict:
    """Read a trainer_state.pt, with a clear error when it is missing, damaged or carries foreign objects.

    weights_only=True: a state handed over with a shared checkpoint folder is a pickle, and unpickling
    anything beyond tensors, numbers, strings and the allow-listed numpy RNG state could run its author's code.
    """
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"training.resume_state_path: {path} does not exist")
    try:
        with torch.serialization.safe_globals(_state_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ResumeError(f"{path}: not a readable trainer state (UnpicklingError: {e}); resume from an "
                              f"earlier checkpoint") from e
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise ResumeError(f"{path}: refused: it holds an object{what} that no trainer state written by sdxl-ff "
                          f"holds, and loading it could run code from whoever made the file; resume from a "
                          f"checkpoint written by a run you trust") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ResumeError(f"{path}: not a readable trainer state ({type(e).__name__}: {e}); resume from an "
                          f"earlier checkpoint") from e
    if not isinstance(state, dict) or "global_step" not in state or "fingerprint" not in state:
        raise ResumeError(f"{path}: not a trainer state written by sdxl-ff")
    return migrate_state(state, path)


def migrate_state(state: dict, path: str | Path) -> dict:
    """The state in the current format (FORMAT_VERSION); a state from a newer sdxl-ff is refused."""
    version = state.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ResumeError(f"{path}: written by a newer sdxl-ff (trainer state format_version {version}; this version "
                          f"reads format_version {FORMAT_VERSION} and older); update sdxl-ff to resume it")
    if version == 1:  # unversioned: the same keys, some of them added over time (absent means: not saved)
        state = {"format_version": 2, "sampler": None, "scaler": None, "ema": None, "base_lrs": {}, **state}
        log.info("resume: %s is a trainer state of format_version 1; read as format_version 2", path)
    return state


def resume_state_for(resume_from: str, resume_state_path: str | None, explicit: bool) -> dict | None:
    """The state to continue from, or None for weights-only resume (no state file beside the weights)."""
    if not Path(resume_from).is_dir():
        raise ResumeError(f"training.resume_from: {resume_from} is not a folder; give a checkpoint folder "
                          f"(<output_dir>/checkpoints/step-...) or a finished output folder")
    if not (Path(resume_from) / "model_index.json").is_file():
        raise ResumeError(f"training.resume_from: {resume_from} holds no model (no model_index.json); give a "
                          f"checkpoint folder (<output_dir>/checkpoints/step-...) or a finished output folder")
    if resume_state_path and (explicit or Path(resume_state_path).is_file()):
        state = load_state(resume_state_path)
        if state.get("ema_in_weights"):  # a final model.use_ema save holds the EMA, not the trained weights
            log.warning("resume: %s holds the EMA weights (the final save of a model.use_ema run), not the "
                        "trained ones: training continues from the EMA weights, with the optimizer state of the "
                        "trained weights. For an exact continuation resume from a checkpoint folder "
                        "(<output_dir>/checkpoints/step-*)", resume_from)
        return state
    log.warning("resume: %s has no %s; continuing its weights with a fresh optimizer from step 0",
                resume_from, STATE_NAME)
    return None


# --------------------------------------------------------------------------- saving

class Checkpointer:
    """Writes numbered checkpoints under `<output_dir>/checkpoints/` and keeps the newest `keep`."""

    def __init__(self, output_dir: str | Path, keep: int | None):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:07d}"

    def existing(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def remove_leftovers(self) -> None:
        """Delete temporary folders of saves that were interrupted (they are never loadable)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Fill a temporary folder with write(tmp), then rename it to step-NNNNNNN; prune old ones."""
        final = self.path_for(step)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write(tmp)
            pause_point(f"save-{step}")  # the folder is written but not yet renamed; tests kill -9 here
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except AnomalyError:  # non-finite weights: not a write failure, and the message says where to go on
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as e:  # torch and safetensors report I/O failures as their own error types
            reason = describe_write_error(e, self.root)
            shutil.rmtree(tmp, ignore_errors=True)
            previous = [p for p in self.existing() if p != final]
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise SaveError(errno.EIO, f"could not write checkpoint {final}: {reason}; {kept}. Free space or fix "
                                       f"the folder, then resume with --set training.resume_from=<checkpoint>") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def prune(self) -> None:
        if self.keep is None:
            return
        for old in self.existing()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed old checkpoint %s (training.keep_checkpoints=%d)", old, self.keep)


# --------------------------------------------------------------------------- interruption

class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop at the next optimizer-step boundary.

    A second SIGINT raises KeyboardInterrupt at once (the last complete checkpoint stays loadable).
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then saving a resumable checkpoint "
                    "(press Ctrl-C again to abort without saving)", self.signal_name)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their owner
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- resuming a run

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train_sdxl_ff.py"


def rerun_command(cfg: Config, *assignments: str, replaces: tuple[str, ...] = ()) -> str:
    """This run's command line (same config, same --set values, minus the keys in `replaces`, plus `assignments`).

    It names the running interpreter and the script's absolute path (no venv to activate) and starts with a
    `cd` to the folder this run started in, where the config's relative paths (data/images, .output) point.
    """
    kept = [o for o in cfg.overrides if not o.startswith(tuple(f"{key}=" for key in replaces))]
    words = [sys.executable, str(TRAIN_SCRIPT)] + (["--config", cfg.source] if cfg.source != "<defaults>" else [])
    for assignment in [*kept, *assignments]:
        words += ["--set", assignment]
    return f"cd {shlex.quote(str(Path.cwd()))} && {shlex.join(words)}"


def resume_command(cfg: Config, checkpoint: str | Path, *assignments: str) -> str:
    """The command line that continues this run from `checkpoint` (with more `--set` assignments, if given)."""
    keys = ("training.resume_from", "training.resume_state_path", *(a.split("=")[0] for a in assignments))
    return rerun_command(cfg, *assignments, f"training.resume_from={checkpoint}", replaces=keys)


def check_model_id(state: dict, model_id: str, state_path: str | Path) -> None:
    """Refuse a model.id other than the one the resumed run trained: the saved config would record a wrong base.

    On resume the weights come from training.resume_from and model.id is not loaded, so a changed model.id
    would change nothing but the record.
    """
    trained_from = state.get("model_id")
    if trained_from is not None and trained_from != model_id:
        raise ResumeError(f"model.id is {model_id!r}, but the state {state_path} continues a run of "
                          f"{trained_from!r}. A resumed run trains the weights of training.resume_from, not "
                          f"model.id, and its saved config would name the wrong base model: set model.id to "
                          f"{trained_from!r} (--set {shlex.quote(f'model.id={trained_from}')}) to continue that "
                          f"run, or leave out training.resume_from to fine-tune {model_id!r} from the start")


def load_resume_state(cfg: Config, accelerator=None) -> dict | None:
    """The trainer state to continue from (training.resume_from), or None for a fresh run.

    With several processes the main one alone repairs an interrupted folder swap while the others
    wait (they share the folder); then every process reads the state.
    """
    t = cfg.training
    if not t.resume_from:
        return None
    several = accelerator is not None and accelerator.num_processes > 1
    if not several or accelerator.is_main_process:
        recover_interrupted_swap(Path(t.resume_from))
    if several:
        accelerator.wait_for_everyone()
    state = resume_state_for(t.resume_from, t.resume_state_path, explicit=cfg.resume_state_explicit)
    if state is not None:  # the run's parallelism checks the state's sharding (parallel/strategy.py)
        check_model_id(state, cfg.model.id, t.resume_state_path)
    return state


def check_sharding(saved: dict | None, sharding: str, num_processes: int, state_path: str | Path) -> None:
    """A sharded state continues only as sharded, on as many processes as wrote it (parallel/fsdp2_state.py)."""
    written = saved["type"] if saved else "none"
    if written != sharding:
        raise ResumeError(f"training.sharding is {sharding!r}, but the state {state_path} was written with "
                          f"training.sharding {written!r} (its optimizer state is stored "
                          f"{'in shards' if saved else 'whole'}); resume with --set training.sharding={written}")
    if saved and saved["world_size"] != num_processes:
        raise ResumeError(f"the state {state_path} was written by {saved['world_size']} processes (training.sharding "
                          f"\"fsdp2\"), but this run has {num_processes}: its optimizer state and EMA are cut into "
                          f"{saved['world_size']} shards, and the data order depends on the number of processes. "
                          f"Launch {saved['world_size']} processes (accelerate launch --num_processes "
                          f"{saved['world_size']} ...) to resume it")


def _setting(value):
    """An optimizer setting in comparable form (betas come back as a list or a tuple)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def restore(state: dict, optimizer, accelerator, rates: dict[str, float]) -> None:
    """Put optimizer and scaler back where the state left them; the config's settings win.

    torch's load_state_dict also brings back each group's weight_decay, betas and eps; the optimizer was
    just built from the config, so its values are put back over them (and each change is logged).
    """
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    if state["optimizer"] is not None:  # None: a sharded run's state, already loaded from its shards
        optimizer.load_state_dict(state["optimizer"])
    changed = {}
    for group, wanted in zip(optimizer.param_groups, configured, strict=True):
        for key, value in wanted.items():
            if _setting(group.get(key)) != _setting(value):
                changed[(group["name"], key)] = (group.get(key), value)
                group[key] = value
    for (name, key), (stored, value) in changed.items():
        log.info("resume: %s %s %s in the state, %s in the config: the config wins", name, key,
                 _setting(stored), _setting(value))
    for group in optimizer.param_groups:
        stored = state["base_lrs"].get(group["name"], float(group["lr"]))  # group["lr"] holds base × factor
        if stored != rates[group["name"]]:
            log.info("resume: %s learning rate %.3g in the state, %.3g in the config: the config wins",
                     group["name"], stored, rates[group["name"]])
        set_group_lr(group, rates[group["name"]])
    if accelerator.scaler is not None and state["scaler"]:
        accelerator.scaler.load_state_dict(state["scaler"])
