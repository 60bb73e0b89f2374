"""Keeping the console to our own lines: the library messages and progress bars a user gets nothing from.

Called once at start by the trainer, the converter and the inspector, before the libraries speak.
"""

from __future__ import annotations

import logging
import os
import warnings

# Their INFO/WARNING lines repeat what our log says in our words (or are irrelevant, like bitsandbytes'
# "kernels" package missing for a CPU 4-bit path we never use); errors still show.
# torch.utils._pytree: torchao (imported by diffusers when installed) registers enums the deprecated way.
NOISY_LOGGERS = ("diffusers", "transformers", "accelerate", "bitsandbytes", "httpx", "torch.utils._pytree")
# transformers' bars for each text encoder's save and load: several per checkpoint and resume, each a blink
QUIET_BARS = ("Writing model shards", "Loading weights")


def _quiet_bars(factory, args: tuple, kwargs: dict):
    from transformers.utils.logging import EmptyTqdm
    return (EmptyTqdm if kwargs.get("desc") in QUIET_BARS else factory)(*args, **kwargs)


def quiet_libraries() -> None:
    """Silence the known library noise; our logger ("sdxl_ff") and our progress bars are untouched."""
    quiet_loggers()
    # transformers' own hook for its progress bars (hub downloads keep theirs)
    from transformers.utils import logging as hf_logging
    hf_logging.set_tqdm_hook(_quiet_bars)
    # diffusers' bar while a pipeline or a single-file checkpoint loads ("Loading pipeline components...");
    # the sampling bars of its pipelines are switched off where they run
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.disable_progress_bar()


def quiet_loggers() -> None:
    """The loggers and warnings alone (cheap: imports nothing), for tools that never load transformers."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # diffusers and transformers reset their root logger's level when first imported, to their *_VERBOSITY
    # variable's value: import-time warnings (e.g. diffusers' torchao probe) pass unless that says "error".
    # A user's own setting wins.
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    # k-diffusion imports OpenAI's clip, which imports setuptools' deprecated pkg_resources
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
