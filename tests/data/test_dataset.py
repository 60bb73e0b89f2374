"""Images and captions: sizes, micro-conditioning that tells the truth, one resolution per batch, bad files."""

import logging

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data.records import DataError, scan_images
from sdxl_ff.data.synthetic import draw_shape


def make(folder, name, width, height, caption="a red circle"):
    draw_shape("circle", "red", "blue", width, height).save(folder / f"{name}.png")
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption)


def test_bundled_sample_set():
    records = scan_images(ROOT / "data" / "images")
    assert 8 <= len(records) <= 16
    assert all(r.caption.endswith("background") for r in records)


def test_limit_longest_side():
    assert data_lib.limit_longest_side(3000, 2000, 1024) == (640, 1024)  # 682.7 -> 640
    assert data_lib.limit_longest_side(500, 300, 1024) == (256, 448)  # never upscaled
    assert data_lib.limit_longest_side(40, 40, 1024) == (64, 64)


def test_micro_conditioning_describes_the_crop(tmp_path):
    # A 300x200 image with a 1-pixel marker column at x=150 and row at y=100.
    array = np.zeros((200, 300, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "img.png")
    (tmp_path / "img.txt").write_text("x")
    records = scan_images(tmp_path)
    ds = data_lib.CaptionedImageDataset(records, lambda r: (128, 256))
    sample = ds[0]
    # cover scale = max(256/300, 128/200) = 0.8533 -> 256x171, centre crop of 43 rows: top 21
    assert sample["pixels"].shape == (3, 128, 256) and sample["pixels"].dtype == torch.float16
    assert sample["original_size"].tolist() == [200, 300]
    assert sample["target_size"].tolist() == [128, 256]
    assert sample["crop_top_left"].tolist() == [21, 0]


def test_exif_rotation_swaps_original_size(tmp_path):
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90°: displayed as 200 wide, 300 high
    image.save(tmp_path / "r.jpg", exif=exif)
    (tmp_path / "r.txt").write_text("x")
    (record,) = scan_images(tmp_path)
    assert (record.width, record.height) == (200, 300)
    sample = data_lib.CaptionedImageDataset([record], lambda r: (192, 128))[0]
    assert sample["original_size"].tolist() == [300, 200]


def test_pixels_in_range(tmp_path):
    make(tmp_path, "a", 64, 64)
    sample = data_lib.CaptionedImageDataset(scan_images(tmp_path), lambda r: (64, 64))[0]
    assert sample["pixels"].min() >= -1 and sample["pixels"].max() <= 1
    red = sample["pixels"][:, 2, 2].float()  # corner: blue background (40, 70, 220)
    assert torch.allclose(red, torch.tensor([40, 70, 220]) / 127.5 - 1, atol=1e-2)


def test_batches_hold_one_resolution(tmp_path):
    sizes = [(64, 64)] * 5 + [(64, 128)] * 3 + [(128, 64)] * 2
    sampler = data_lib.SameSizeBatchSampler(sizes, batch_size=2, seed=3)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(10))
    for batch in batches:
        assert len({sizes[i] for i in batch}) == 1
    assert sampler.batches(0) == batches and sampler.batches(1) != batches
    sampler.start = 2
    assert list(sampler) == [[(0, i) for i in b] for b in batches[2:]]  # (epoch, index) pairs


def test_missing_caption_stops_with_file_name(tmp_path):
    make(tmp_path, "ok", 64, 64)
    make(tmp_path, "nocap", 64, 64, caption=None)
    with pytest.raises(DataError) as info:
        scan_images(tmp_path)
    assert "nocap.png: no caption file nocap.txt" in str(info.value)
    assert "data.skip_bad_images=true" in str(info.value)


def test_corrupt_image_stops_with_file_name(tmp_path):
    make(tmp_path, "ok", 64, 64)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(DataError, match=r"broken.png: not a readable image"):
        scan_images(tmp_path)


def test_skip_bad_images_warns_and_skips(tmp_path, caplog):
    make(tmp_path, "ok", 64, 64)
    make(tmp_path, "nocap", 64, 64, caption=None)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        records = scan_images(tmp_path, skip_bad=True)
    assert [r.path.name for r in records] == ["ok.png"]
    assert "broken.jpg" in caplog.text and "nocap.png" in caplog.text


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no usable images"):
        scan_images(tmp_path)


def test_file_broken_after_scan_names_file(tmp_path):
    make(tmp_path, "a", 64, 64)
    ds = data_lib.CaptionedImageDataset(scan_images(tmp_path), lambda r: (64, 64))
    (tmp_path / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"a.png: could not be read during training"):
        ds[0]


def test_caption_with_a_utf8_bom_has_no_bom_in_the_caption(tmp_path):
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa red cat, sitting\n".encode())  # what Notepad writes as "UTF-8 with BOM"
    (record,) = scan_images(tmp_path)
    assert record.caption == "a red cat, sitting"
