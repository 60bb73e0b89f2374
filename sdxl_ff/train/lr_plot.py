"""The planned learning-rate curve as a PNG (Pillow only), written at start so it can be looked at."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdxl_ff.config.schema import TrainingConfig
from sdxl_ff.runtime.files import write_atomic
from sdxl_ff.train.lr_schedule import describe, lr_factor

WIDTH, HEIGHT = 800, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50  # margins for the tick labels and the title


def render_curve(factors: list[float], base_lr: float, title: str) -> Image.Image:
    """A line plot of base_lr × factor against the optimizer step (1 .. len(factors))."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    n = len(factors)
    top = max(max(factors, default=1.0), 1e-12)

    def to_xy(step: int, factor: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * ((step - 1) / max(1, n - 1))
        return x, y0 - (y0 - y1) * (factor / top)

    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black", width=1)
    for i in range(5):  # y ticks: the learning rate
        frac = i / 4
        y = y0 - (y0 - y1) * frac
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.line([(x0 + 1, y), (x1, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{base_lr * top * frac:.2e}", fill="black", font=font)
    for i in range(5):  # x ticks: the optimizer step
        step = 1 + round((n - 1) * i / 4)
        x, _ = to_xy(step, 0.0)
        draw.line([(x, y0), (x, y0 + 4)], fill="black")
        draw.text((x - 10, y0 + 8), str(step), fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 40, HEIGHT - 18), "optimizer step", fill="black", font=font)
    draw.text((x0, 12), title, fill="black", font=font)
    if n == 1:
        draw.ellipse([(x0 - 2, to_xy(1, factors[0])[1] - 2), (x0 + 2, to_xy(1, factors[0])[1] + 2)], fill="blue")
    else:
        draw.line([to_xy(i + 1, f) for i, f in enumerate(factors)], fill=(30, 90, 200), width=2)
    return image


def write_curve_png(path: str | Path, factors: list[float], base_lr: float, title: str) -> None:
    """Render the curve and write it atomically to `path`."""
    image = render_curve(factors, base_lr, title)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def write_planned_curve(training: TrainingConfig, total_steps: int) -> Path:
    """Write `<output_dir>/lr_schedule.png`, the UNet's rate at every optimizer step of this run."""
    path = Path(training.output_dir) / "lr_schedule.png"
    factors = [lr_factor(step, training, total_steps) for step in range(1, total_steps + 1)]
    write_curve_png(path, factors, training.lr_unet, f"planned UNet learning rate: {describe(training)}")
    return path
