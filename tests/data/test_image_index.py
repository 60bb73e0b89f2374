"""The image size index: a second start-up opens no image; a changed, added or removed image is noticed."""

import json
import logging
import os

import pytest
import torch
from conftest import tiny_config
from PIL import Image

import train_sdxl_ff
from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data.buckets import cover_crop
from sdxl_ff.data.scan import scan_sources
from sdxl_ff.data.synthetic import write_sample_set


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
    return scan_sources(cfg)[1], tmp_path / "image_index.json"


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
    scan_sources(cfg)
    scan_sources(cfg)
    assert len(opens) == 4 and not (tmp_path / "image_index.json").exists()


def edit_entry(index_file, name, **values):
    """Replace fields of the entry of image `name` in the index file (size and mtime kept: the entry is used)."""
    stored = json.loads(index_file.read_text())
    key = next(k for k in stored["images"] if k.endswith(os.sep + name))
    fields = ["size", "mtime_ns", "width", "height", "alpha"]
    entry = [values.get(f, v) for f, v in zip(fields, stored["images"][key], strict=True)]
    stored["images"][key] = values.get("entry", entry)
    index_file.write_text(json.dumps(stored))
    return key


def test_an_entry_of_width_0_is_dropped_with_a_warning_and_the_image_read_again(tmp_path, opens, caplog):
    # issue 28: width 0 in the index was a ZeroDivisionError traceback when the training size was chosen
    folder = tmp_path / "images"
    paths = write_sample_set(folder, count=3, width=96, height=64)
    _, index_file = scan(tmp_path, folder)
    key = edit_entry(index_file, paths[1].name, width=0)
    opens.clear()
    with caplog.at_level(logging.WARNING):
        train_set, _ = data_lib.build_data(tiny_config(tmp_path, folder), seed=1, num_processes=1)
    assert opens == [paths[1].name] and [(r.width, r.height) for r in train_set.records] == [(96, 64)] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"image index {index_file}: 1 entry is not valid, e.g. {key}: width x height 0x64 is not "
                        f"1 to 2147483647 pixels a side; dropped, those images are read again"]
    assert json.loads(index_file.read_text())["images"][key][2:] == [96, 64, 0]  # rewritten from the file


@pytest.mark.parametrize("entry, problem", [
    ("96x64", '"96x64" is not 5 integers'),
    ([1, 2, 3], "[1, 2, 3] is not 5 integers"),
    (None, "null is not 5 integers"),
    ({"width": 96}, '{"width": 96} is not 5 integers'),
    ([100, 5, "96", 64, 0], '[100, 5, "96", 64, 0] is not 5 integers'),
    ([100, 5, 96.0, 64, 0], "[100, 5, 96.0, 64, 0] is not 5 integers"),
    ([100, 5, True, 64, 0], "[100, 5, true, 64, 0] is not 5 integers"),
    ([100, 5, 96, -64, 0], "width x height 96x-64 is not 1 to 2147483647 pixels a side"),
    ([100, 5, 2**31, 64, 0], "width x height 2147483648x64 is not 1 to 2147483647 pixels a side"),
    ([-1, 5, 96, 64, 0], "file size -1 is negative"),
    ([100, 5, 96, 64, 2], "alpha 2 is not 0 or 1"),
])
def test_entries_of_the_wrong_json_type_or_range_are_dropped_with_one_warning(tmp_path, opens, caplog, entry,
                                                                              problem):
    folder = tmp_path / "images"
    paths = write_sample_set(folder, count=3, width=96, height=64)
    _, index_file = scan(tmp_path, folder)
    first = edit_entry(index_file, paths[0].name, entry=entry)
    edit_entry(index_file, paths[1].name, entry=entry)
    opens.clear()
    with caplog.at_level(logging.WARNING):
        records, _ = scan(tmp_path, folder)
    assert sorted(opens) == [p.name for p in paths[:2]] and [(r.width, r.height) for r in records] == [(96, 64)] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 entries are not valid, e.g. " in warnings[0] and problem in warnings[0]
    assert len(json.loads(index_file.read_text())["images"]) == 3 and first in warnings[0]


@pytest.mark.parametrize("text", ["[]", "null", '{"format": "sdxl-ff-image-index-1", "images": [1, 2]}',
                                  '{"format": "sdxl-ff-image-index-1", "images": 5}'])
def test_an_index_of_the_wrong_json_shape_is_rebuilt_with_a_warning(tmp_path, opens, caplog, text):
    folder = tmp_path / "images"
    write_sample_set(folder, count=2, width=96, height=64)
    (tmp_path / "image_index.json").write_text(text)
    with caplog.at_level(logging.WARNING):
        records, index_file = scan(tmp_path, folder)
    assert len(records) == 2 and len(opens) == 2 and "cannot be read" in caplog.text
    assert len(json.loads(index_file.read_text())["images"]) == 2


def test_a_wrong_size_in_the_index_is_found_when_the_image_opens(tmp_path, caplog):
    # issue 28: 4096x64 for an image of another size was "it changed during the run, restart it", and every
    # restart read the same entry again; now the image trains, and its entry is dropped for the next start-up
    folder = tmp_path / "images"
    paths = write_sample_set(folder, count=2, width=96, height=64)
    _, index_file = scan(tmp_path, folder)
    key = edit_entry(index_file, paths[0].name, width=4096)
    cfg = tiny_config(tmp_path, folder)
    train_set, _ = data_lib.build_data(cfg, seed=1, num_processes=1)
    size = train_set.sizes[0]
    assert train_set.records[0].width == 4096 and size != train_set.sizes[1]  # the wrong size's resolution
    with caplog.at_level(logging.WARNING):
        sample = train_set[0]
    # trained at the resolution chosen, cut from the real 96x64 image
    crop = cover_crop(96, 64, size)
    assert sample["pixels"].shape == (3, *size) and sample["original_size"].tolist() == [64, 96]
    assert sample["crop_top_left"].tolist() == [crop.top, crop.left] and crop.resized != (64, 96)
    assert torch.equal(sample["pixels"], data_lib.to_pixels(data_lib.apply_crop(Image.open(paths[0]).convert("RGB"),
                                                                                crop)))
    assert f"{paths[0]}: is 96x64, but the image index {index_file} said 4096x64; the entry is dropped" in caplog.text
    assert key not in json.loads(index_file.read_text())["images"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again, _ = data_lib.build_data(cfg, seed=1, num_processes=1)
        again[0]
    assert again.records[0].width == 96 and "image index" not in caplog.text


def test_an_image_that_changes_during_the_run_still_stops_it(tmp_path):
    folder = tmp_path / "images"
    paths = write_sample_set(folder, count=2, width=96, height=64)
    scan(tmp_path, folder)
    train_set, _ = data_lib.build_data(tiny_config(tmp_path, folder), seed=1, num_processes=1)  # from the index
    Image.new("RGB", (64, 96)).save(paths[0])
    with pytest.raises(data_lib.DataError, match="is 64x96 now, 96x64 at start-up; it changed during the run"):
        train_set[0]


def test_a_wrong_size_in_the_index_with_the_latent_cache_trains_and_restarts(tmp_path, caplog):
    folder = tmp_path / "images"
    paths = write_sample_set(folder, count=2, width=96, height=64)
    _, index_file = scan(tmp_path, folder)
    key = edit_entry(index_file, paths[0].name, width=4096)
    cache = {"data.size": "64", "data.latent_cache.enabled": "true",
             "data.latent_cache.cache_dir": str(tmp_path / "latents"), "data.latent_cache.dtype": "fp32",
             "training.batch_size": "2"}
    for run in range(2):  # the second run is the restart that used to fail again
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = train_sdxl_ff.train(tiny_config(tmp_path, folder, steps=1, **cache), overwrite=True)
        assert len(result["losses"]) == 1
        corrected = f"image index {index_file}: 1 entry had a size that is not the image's, e.g. {key}: 4096x64 " \
                    f"in the index, 96x64 in the file; corrected from the files"
        assert (corrected in caplog.text) == (run == 0)
        assert json.loads(index_file.read_text())["images"][key][2:] == [96, 64, 0]


def test_the_pixel_limit_holds_for_sizes_from_the_index(tmp_path, opens):
    folder = tmp_path / "images"
    paths = write_sample_set(folder, count=2, width=96, height=64)
    scan(tmp_path, folder)
    opens.clear()
    cfg = tiny_config(tmp_path, folder, **{"data.max_image_pixels": str(96 * 64 - 1)})
    with pytest.raises(data_lib.DataError, match=f"{paths[0]}: 96x64 = 6144 pixels, above the limit "
                                                 f"data.max_image_pixels \\(6143\\)"):
        scan_sources(cfg)
    assert opens == []  # refused from the index, as from the header


def test_linked_folders_are_read_once_and_dangling_image_links_named(tmp_path, caplog):
    # issue 28: a linked subfolder and a dangling image link were skipped without a word
    shared = tmp_path / "shared"
    write_sample_set(shared, count=2, width=96, height=64)
    folder = tmp_path / "images"
    own = write_sample_set(folder, count=1, width=96, height=64)
    (folder / "linked").symlink_to(shared, target_is_directory=True)
    (folder / "linked_again").symlink_to(shared, target_is_directory=True)  # the same folder twice
    (shared / "loop").symlink_to(folder, target_is_directory=True)  # back up the tree: would never end
    for name in ("gone_1.png", "gone_2.jpg"):
        (folder / name).symlink_to(tmp_path / "deleted" / name)
        (folder / name).with_suffix(".txt").write_text("gone")
    (folder / "also_linked.png").symlink_to(own[0])  # a link to an image is an image
    (folder / "also_linked.txt").write_text("linked")
    with caplog.at_level(logging.WARNING):
        records, _ = scan(tmp_path, folder)
    names = [str(r.path.relative_to(folder)) for r in records]
    assert names == [own[0].name, "also_linked.png", *(f"linked/{p.name}" for p in sorted(shared.glob("*.png")))]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{folder}: 2 image link(s) lead to no file (the file they name is gone), e.g. {folder}/gone_1.png; skipped",
        f"{folder}: 2 linked folder(s) lead to a folder already read, e.g. {folder}/linked/loop (leads to {folder}); "
        f"not read again (each image is trained once)"]
