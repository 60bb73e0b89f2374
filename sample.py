"""Render images from a trained SDXL with the trainer's own eval samplers (ComfyUI's image for the same settings).

    python sample.py --model .output/my_run --prompt "a red circle" [--negative ...] [--sampler dpmpp_2m
        --scheduler karras] [--steps 30] [--cfg 7] [--seed 0] [--size 1024x768] [--out red.png]
    python sample.py --model .output/my_run --prompts data/eval_prompts.example.json --out samples/

The options and their checks live in sdxl_ff/eval/sample_options.py, the drawing in sdxl_ff/eval/render.py.
"""

from __future__ import annotations

import logging
import os
import sys

from sdxl_ff.config.errors import UserError
from sdxl_ff.eval.sample_options import read_command_line
from sdxl_ff.runtime.console import quiet_loggers


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    quiet_loggers()
    try:
        request = read_command_line(argv)  # a mistake is answered here, before the imports below (seconds)
        from sdxl_ff.eval.render import sample
        from sdxl_ff.runtime.console import quiet_libraries
        quiet_libraries()
        sample(request)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nerror: interrupted (Ctrl-C); the images written so far are complete", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
