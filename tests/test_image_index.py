"""The image size index: a second start-up opens no image; a changed, added or removed image is noticed."""

import json
import logging
import os

import pytest
from conftest import tiny_config
from PIL import Image

from sdxl_ff import data as data_lib
from sdxl_ff.synthetic import write_sample_set


@pytest.fixture
def opens(monkeypatch):
    """Every PIL Image.open during the test, by file name."""
    seen = []
    real = Image.open

    def counting(fp, *args, **kwargs):
        seen.append(os.path.basename(str(fp)))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return seen


def scan(tmp_path, folder):
    cfg = tiny_config(tmp_path, folder)
    return data_lib.scan_sources(cfg)[1], tmp_path / "image_index.json"


def test_second_start_up_reads_no_image_header(tmp_path, opens, caplog):
    folder = tmp_path / "images"
    write_sample_set(folder, count=6, width=96, height=64)
    with caplog.at_level(logging.INFO):
        first, index_file = scan(tmp_path, folder)
    assert len(opens) == 6  # each image opened once: verify() and the size from one open
    assert "0 image sizes from the index, 6 read from the files" in caplog.text
    stored = json.loads(index_file.read_text())
    assert stored["format"] == "sdxl-ff-image-index-1" and len(stored["images"]) == 6
    opens.clear()
    second, _ = scan(tmp_path, folder)
    assert opens == [] and second == first


def test_changed_added_and_removed_images_are_read_again(tmp_path, opens):
    folder = tmp_path / "images"
    paths = write_sample_set(folder, count=4, width=96, height=64)
    scan(tmp_path, folder)
    Image.new("RGB", (64, 128)).save(paths[0])  # same name, new size and mtime
    paths[1].unlink()
    paths[1].with_suffix(".txt").unlink()
    Image.new("RGB", (80, 80)).save(folder / "new.png")
    (folder / "new.txt").write_text("new")
    opens.clear()
    records, index_file = scan(tmp_path, folder)
    assert sorted(opens) == sorted([paths[0].name, "new.png"])
    assert (records[0].width, records[0].height) == (64, 128)
    assert len(json.loads(index_file.read_text())["images"]) == 4  # the removed image left the index


def test_corrupt_index_is_rebuilt_with_a_warning(tmp_path, opens, caplog):
    folder = tmp_path / "images"
    write_sample_set(folder, count=3, width=96, height=64)
    index_file = tmp_path / "image_index.json"
    index_file.write_text('{"format": "sdxl-ff-image-index-1", "images": {"trunc')
    with caplog.at_level(logging.WARNING):
        records, _ = scan(tmp_path, folder)
    assert len(records) == 3 and "cannot be read" in caplog.text and len(opens) == 3
    assert len(json.loads(index_file.read_text())["images"]) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".image_index")] == []  # no temporary left


def test_index_off_with_an_empty_path(tmp_path, opens):
    folder = tmp_path / "images"
    write_sample_set(folder, count=2, width=96, height=64)
    cfg = tiny_config(tmp_path, folder, **{"data.image_index_path": ""})
    data_lib.scan_sources(cfg)
    data_lib.scan_sources(cfg)
    assert len(opens) == 4 and not (tmp_path / "image_index.json").exists()
