"""Training-flow inspector: look at what the UNet sees and predicts during one training step.

    python demo_training_flow.py [--config config.json] [--samples 3] [--model OUTPUT_DIR] [--port 7860]

Pick a sample and a timestep: the UI shows the training input (after resize and normalisation), x_t
(the noised latents decoded through the VAE), x0_pred (the UNet's estimate of the clean image) and
a cross-attention heatmap for a chosen caption token, plus the loss at that timestep. With --model,
the same sample, timestep and noise also go through a trained output folder for comparison.
The logic lives in sdxl_ff/inspector/forward_pass.py; this file is only the Gradio layout.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the UI
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes warns at import that an optional CPU kernel package is missing; it is not needed here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from typing import TYPE_CHECKING

from sdxl_ff.config.errors import ConfigError, UserError
from sdxl_ff.config.load import add_config_arguments, load_config
from sdxl_ff.runtime.console import quiet_libraries, quiet_loggers

if TYPE_CHECKING:
    from sdxl_ff.inspector.forward_pass import Inspector

log = logging.getLogger("sdxl_ff")


# Show small training images (the tiny model's 128 px) at the column width, without smoothing.
CSS = (".flow-image button:has(.image-frame), .flow-image .image-frame {width: 100%; height: auto;} "
       ".flow-image img {width: 100%; height: auto; object-fit: contain; image-rendering: pixelated;}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Inspect the SDXL training forward pass in the browser.")
    add_config_arguments(parser)
    parser.add_argument("--samples", type=int, default=3, help="how many samples to offer (default: 3)")
    parser.add_argument("--model", metavar="OUTPUT_DIR", help="a trained output folder to compare with the base")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples}")
    return args


def token_choices(tokens: list[str]) -> list[tuple[str, int]]:
    return [(f"{i}: {token}", i) for i, token in enumerate(tokens)]


def default_token(tokens: list[str]) -> int:
    """The first word token (position 1, after the start token) when there is one."""
    return 1 if len(tokens) > 2 else 0


def flow_image(label: str, elem_id: str):
    import gradio as gr
    return gr.Image(label=label, type="numpy", format="png",  # PNG: show exactly the computed pixels
                    elem_id=elem_id, elem_classes="flow-image", interactive=False)


def build_ui(inspector: Inspector):
    import gradio as gr

    names = list(inspector.models)
    first_tokens = inspector.tokens(0)

    def show(index: int, timestep: int, token: int):
        outputs, losses = [], []
        for name in names:
            view = inspector.view(int(index), int(timestep), name)
            if name == names[0]:
                outputs += [view.input_image, view.noisy_image, view.x0_image, view.overlay(int(token))]
            else:
                outputs += [view.x0_image, view.overlay(int(token))]
            losses.append(f"**{name}** loss (MSE to the target) at t={view.timestep}: `{view.loss:.5f}`")
        return [*outputs, "  \n".join(losses)]

    def pick_sample(index: int, timestep: int):
        tokens = inspector.tokens(int(index))
        token = default_token(tokens)
        return [gr.Dropdown(choices=token_choices(tokens), value=token), *show(index, timestep, token)]

    with gr.Blocks(title="sdxl-ff training-flow inspector") as demo:
        gr.Markdown("## sdxl-ff training-flow inspector\nOne training forward pass (no backprop) for the chosen "
                    "sample and timestep, with fixed noise per sample.")
        with gr.Row():
            sample = gr.Dropdown(choices=[(label, i) for i, label in enumerate(inspector.sample_labels())],
                                 value=0, label="sample", elem_id="sample")
            token = gr.Dropdown(choices=token_choices(first_tokens), value=default_token(first_tokens),
                                label="token for the attention heatmap", elem_id="token")
        timestep = gr.Slider(0, inspector.num_train_timesteps - 1, value=inspector.num_train_timesteps // 2,
                             step=1, label="timestep", elem_id="timestep")
        with gr.Row():
            images = [flow_image(label, elem) for label, elem in (
                ("input (resized, normalised)", "input"), ("x_t", "x_t"), ("x0_pred", "x0_pred"),
                ("cross-attention heatmap", "heatmap"))]
        if len(names) > 1:
            with gr.Row():
                gr.Markdown(f"**{names[1]}** (`{inspector.sources[names[1]]}`): the same sample, timestep and "
                            "noise through the trained model.")
                gr.Markdown("")  # keeps the images below x0_pred and the heatmap above
                images += [flow_image(f"x0_pred ({names[1]})", "x0_pred_2"),
                           flow_image(f"heatmap ({names[1]})", "heatmap_2")]
        loss = gr.Markdown(elem_id="loss")
        outputs = [*images, loss]
        sample.change(pick_sample, [sample, timestep], [token, *outputs], trigger_mode="always_last")
        timestep.change(show, [sample, timestep, token], outputs, trigger_mode="always_last")
        token.change(show, [sample, timestep, token], outputs, trigger_mode="always_last")
        demo.load(show, [sample, timestep, token], outputs)
    return demo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    quiet_loggers()  # imports nothing: a config mistake is still reported before the heavy imports
    try:
        check_address(args.host, args.port)  # before anything loads: a busy port is known at once
        cfg = load_config(args.config, args.overrides)  # checked before torch, diffusers and gradio load (seconds)
        quiet_libraries()
        from sdxl_ff.inspector.forward_pass import load_inspector
        inspector = load_inspector(cfg, args.samples, args.model)
        try:
            build_ui(inspector).launch(server_name=args.host, server_port=args.port, show_error=True, css=CSS)
        except OSError as e:  # taken in the meantime: Gradio says "Cannot find empty port"
            raise ConfigError(address_problem(args.host, args.port, str(e).split(". ")[0])) from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def address_problem(host: str, port: int, reason: str) -> str:
    return (f"--port {port}: cannot serve on {host}:{port} ({reason}); another program (another inspector?) "
            f"may be using it: pass another port, e.g. --port {port + 1}, or stop that program")


def check_address(host: str, port: int) -> None:
    """Raise ConfigError naming --port when the inspector could not listen on host:port."""
    try:
        socket.create_server((host, port)).close()  # SO_REUSEADDR as uvicorn: only a live listener blocks it
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(address_problem(host, port, "the port is in use")) from None
        raise ConfigError(f"--host {host} / --port {port}: cannot serve there ({e.strerror or e}); "
                          f"check --host (default 127.0.0.1) and --port") from None


if __name__ == "__main__":
    sys.exit(main())
