"""The trainer's export step: run the converter script on the finished Diffusers folder.

The script runs as its own process (`export.converter_script`, default ./converttosdxl.py), so a
custom converter, e.g. diffusers' classic `convert_diffusers_to_original_sdxl.py`, can take its
place. A missing script is refused at start-up; a failing one is an error after training that
leaves the Diffusers folder in place and prints the command to retry by hand.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from pathlib import Path

from sdxl_ff.config.errors import ConfigError, UserError
from sdxl_ff.config.schema import Config, ExportConfig
from sdxl_ff.runtime.pause import pause_point

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_CONVERTER = REPO_ROOT / "converttosdxl.py"


class ExportFailed(UserError, RuntimeError):
    """The converter ran and failed; the Diffusers output is complete and stays."""


def find_converter(script: str) -> Path | None:
    """The script as given (absolute or relative to the working directory), else relative to the repo."""
    path = Path(script).expanduser()
    for candidate in (path, REPO_ROOT / path) if not path.is_absolute() else (path,):
        if candidate.is_file():
            return candidate.resolve()
    return None


def check_export(cfg: Config) -> None:
    """Refuse at start-up, not after hours of training, when the converter cannot be found or would refuse the
    path (converttosdxl.py writes nothing inside the model folder it converts)."""
    e = cfg.export
    if not e.save_single_file:
        return
    if find_converter(e.converter_script) is None:
        raise ConfigError(f"export.converter_script: {e.converter_script!r} not found (looked in "
                          f"{Path.cwd()} and {REPO_ROOT}); give the path to converttosdxl.py or set "
                          f"export.save_single_file to false")
    if Path(e.checkpoint_path).resolve().is_relative_to(Path(cfg.training.output_dir).resolve()):
        raise ConfigError(f"export.checkpoint_path: {e.checkpoint_path} lies inside training.output_dir "
                          f"{cfg.training.output_dir}, the model folder it is converted from; give a path outside "
                          f"it (the default is run.checkpoint_root/<run.name>.safetensors)")


def converter_command(export: ExportConfig, output_dir: str | Path) -> list[str]:
    """The command line, in the argument names of diffusers' classic SDXL conversion script."""
    script = find_converter(export.converter_script)
    if script is None:
        raise ExportFailed(f"export.converter_script {export.converter_script!r} disappeared during training")
    # absolute paths: the printed retry command runs from any folder
    command = [sys.executable, str(script), "--model_path", str(Path(output_dir).absolute()),
               "--checkpoint_path", str(Path(export.checkpoint_path).absolute())]
    if script == BUNDLED_CONVERTER:  # the trainer owns the path: a resumed or --overwrite run replaces its file
        command.append("--overwrite")
    if export.half_precision:
        command.append("--half")
    if export.use_safetensors:
        command.append("--use_safetensors")
    elif script == BUNDLED_CONVERTER:  # explicit, so a .bin or extension-less path is not written as safetensors
        command.append("--no-safetensors")
    # other converters follow the classic diffusers script: no --use_safetensors means a pickled checkpoint
    return command + [str(arg) for arg in export.extra_args]


class ExportInterrupted(ExportFailed):
    """Ctrl-C while the converter ran: the trained model is saved; only the single file is missing."""


def export_single_file(export: ExportConfig, output_dir: str | Path) -> None:
    """Write export.checkpoint_path from the Diffusers folder; raise ExportFailed with a retry command."""
    command = converter_command(export, output_dir)
    # the trainer's own (derived) export folder: created here, as the start-up probe left no folder behind;
    # the converter itself refuses a missing folder, which from a user's hand is more likely a typo
    Path(export.checkpoint_path).parent.mkdir(parents=True, exist_ok=True)
    log.info("export: %s", shlex.join(command))
    # Its own session: a Ctrl-C in the terminal reaches only the trainer, which stops the converter
    # quietly (no second traceback from the child) and says what is saved and how to finish.
    converter = subprocess.Popen(command, start_new_session=True)
    try:
        pause_point("export")  # the converter has started; tests send Ctrl-C here
        returncode = converter.wait()
    except KeyboardInterrupt:
        stop_quietly(converter, Path(export.checkpoint_path))
        raise ExportInterrupted(f"interrupted (Ctrl-C) during the single-file export. Training finished and the "
                                f"model is saved: {Path(output_dir).absolute()} is the complete Diffusers folder "
                                f"with its trainer state; only {export.checkpoint_path} was not written. Finish the "
                                f"export with:\n  {shlex.join(command)}") from None
    if returncode != 0 or not Path(export.checkpoint_path).is_file():
        raise ExportFailed(f"export: the converter failed (exit code {returncode}); the Diffusers folder "
                           f"{output_dir} is complete and stays. Retry by hand: {shlex.join(command)}")
    log.info("export: wrote %s", export.checkpoint_path)


def stop_quietly(converter: subprocess.Popen, target: Path) -> None:
    """End the converter, then remove the temporary file its atomic write leaves (state.write_atomic's name)."""
    converter.terminate()  # SIGTERM: no Python handler runs, so no traceback
    try:
        converter.wait(timeout=30)
    except subprocess.TimeoutExpired:
        converter.kill()
        converter.wait()
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
