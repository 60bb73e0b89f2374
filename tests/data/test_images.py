"""Every PIL image mode becomes the right 8-bit RGB: 16-bit data scaled, not clipped to white."""

import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_ff.config.load import load_config
from sdxl_ff.data.dataset import build_data, load_image
from sdxl_ff.data.images import DEFAULT_MAX_PIXELS, to_rgb
from sdxl_ff.data.records import DataError, scan_images


def write_png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit RGB (3 channels) or RGBA (4) PNG; PIL reads these but cannot write them, so the PNG is built here."""
    height, width, channels = values.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def pixel(image: Image.Image) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return tuple(int(v) for v in np.asarray(image)[0, 0])


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grey_png_is_scaled_not_white(tmp_path, mode):
    values = np.array([[0, 255, 30000, 65535]], dtype="<u2" if mode == "I;16" else ">u2")
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # PIL keeps the 16 bits
    image = load_image(path)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 0, 117, 255]  # x >> 8; PIL's convert gives [0, 255, 255, 255]


def test_16_bit_rgb_and_rgba_pngs(tmp_path):
    rgb = write_png16(tmp_path / "rgb48.png", np.array([[[30000, 65535, 512]]]))
    rgba = write_png16(tmp_path / "rgba64.png", np.array([[[30000, 65535, 512, 0]]]))
    assert pixel(load_image(rgb)) == (117, 255, 2)
    assert pixel(load_image(rgba)) == (117, 255, 2)  # alpha dropped, as for 8-bit RGBA


def test_32_bit_integer_and_float_modes():
    integer = Image.fromarray(np.array([[-5, 30000, 65535, 70000]], dtype=np.int32))
    assert integer.mode == "I"
    assert np.asarray(to_rgb(integer))[0, :, 1].tolist() == [0, 117, 255, 255]
    floats = Image.fromarray(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(to_rgb(floats))[0, :, 2].tolist() == [0, 0, 128, 255, 255, 0]


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_images_keep_their_colours(tmp_path, transparent):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((0, 0), 1)
    if transparent:
        image.info["transparency"] = 0
    path = tmp_path / "palette.png"
    image.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Palette images with Transparency" warning would be console noise
        assert pixel(load_image(path)) == (10, 20, 30)


@pytest.mark.parametrize("mode, value, expected", [
    ("1", 1, (255, 255, 255)), ("L", 77, (77, 77, 77)), ("LA", (77, 0), (77, 77, 77)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)), ("RGB", (10, 20, 30), (10, 20, 30)),
    ("PA", None, (10, 20, 30)), ("CMYK", (10, 20, 30, 0), (245, 235, 225)),
])
def test_other_modes(tmp_path, mode, value, expected):
    if mode == "PA":
        image = Image.new("PA", (1, 1))
        image.putpalette([10, 20, 30] * 256)
    else:
        image = Image.new(mode, (1, 1), value)
    assert pixel(to_rgb(image)) == expected
    if mode not in ("CMYK", "PA"):  # PNG cannot hold CMYK; through a real file where the format can
        image.save(tmp_path / "x.png")
        assert pixel(load_image(tmp_path / "x.png")) == expected


def test_an_image_above_the_pixel_limit_is_named_with_its_size_and_the_key(tmp_path):
    # 200 M pixels, above PIL's decompression-bomb limit (2 x 89478485), in a 1-bit PNG of a few kB
    Image.new("1", (20000, 10000)).save(tmp_path / "huge.png")
    (tmp_path / "huge.txt").write_text("a huge image")
    with pytest.raises(DataError) as info:
        scan_images(tmp_path)
    assert (f"{tmp_path / 'huge.png'}: 20000x10000 = 200000000 pixels, above the limit data.max_image_pixels "
            f"(178956970), a guard against decompression bombs; if you trust the file, raise it "
            f"(--set data.max_image_pixels=200000000) or set it to null") in str(info.value)
    (record,) = scan_images(tmp_path, max_pixels=200_000_000)  # allowed when raised
    assert (record.width, record.height) == (20000, 10000)
    (record,) = scan_images(tmp_path, max_pixels=None)
    with pytest.raises(DataError, match="above the limit data.max_image_pixels \\(1000\\)"):
        scan_images(tmp_path, max_pixels=1000)


def test_the_default_limit_is_the_one_pil_refuses_at():
    cfg = load_config(None, ["run.name=x", "training.num_steps=1", "model.train_text_encoder_1=false"])
    assert cfg.data.max_image_pixels == DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS


def test_images_smaller_than_their_training_size_are_named_in_a_warning(tmp_path, caplog):
    for name, size in [("thin", (1, 100)), ("small", (30, 100)), ("fine", (200, 200))]:
        Image.new("RGB", size, (10, 20, 30)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    cfg = load_config(None, ["run.name=x", "training.num_steps=1", "model.train_text_encoder_1=false",
                             f"data.image_dir={tmp_path}", "data.size=128"])
    with caplog.at_level(logging.WARNING):
        build_data(cfg, seed=0, num_processes=1)
    assert (f"2 image(s) are smaller than their training size and are upscaled (blurrier than the rest; replace them "
            f"or leave them out): {tmp_path / 'small.png'} (30x100 -> 64x64), {tmp_path / 'thin.png'} (1x100 -> 64x64)"
            ) in caplog.text
    assert "fine.png" not in caplog.text
