"""Masked loss and per-source loss weights: masks cropped like their images, the loss maths in closed form."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data import latent_cache, masks
from sdxl_ff.data.masks import to_latent_grid
from sdxl_ff.data.records import DataError
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.objective.predict import LossWeighting, StepOutput, masked_mse, predict, weighted_loss


def write_pair(folder, name, width=128, height=64, mask_columns=(32, 64), mask_size=None, alpha=False):
    """An image with a caption and a mask white in `mask_columns` (of the original image), black elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, mask_columns[0]:mask_columns[1]] = 255
    if alpha:
        Image.fromarray(np.dstack([pixels, mask])).save(folder / f"{name}.png")
    else:
        Image.fromarray(pixels).save(folder / f"{name}.png")
        mw, mh = mask_size or (width, height)
        Image.fromarray(mask).resize((mw, mh)).save(folder / f"{name}_mask.png")
    (folder / f"{name}.txt").write_text("noise")


def masked_config(tmp, folder, **source):
    entries = [{"image_dir": str(folder), "masks": True, **source}]
    return tiny_config(tmp, tmp, **{"data.image_dir": "null", "data.datasets": json.dumps(entries), "data.size": "64"})


@pytest.mark.parametrize("alpha", [False, True])
def test_mask_is_cropped_like_its_image_and_averaged_to_the_latent_grid(tmp_path, alpha):
    # 128x64 image, training size 64x64: no resize, centre crop at left 32; the mask is white in columns 32-63,
    # so after the crop in columns 0-31: latent columns 0-3 are 1, 4-7 are 0.
    write_pair(tmp_path / "img", "a", alpha=alpha)
    cfg = masked_config(tmp_path, tmp_path / "img", mask_from_alpha=alpha)
    train_set, _ = data_lib.build_data(cfg, seed=1, num_processes=1)
    assert [r.path.name for r in train_set.records] == ["a.png"]  # a_mask.png is a mask, not an image
    sample = train_set[0]
    assert sample["crop_top_left"].tolist() == [0, 32] and sample["pixels"].shape == (3, 64, 64)
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1
    assert sample["mask"].dtype == torch.float32 and torch.equal(sample["mask"], expected)


def test_latent_grid_is_the_mean_of_each_cell():
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:8, :4] = 255  # the top-left cell half white
    mask[8:, 8:] = 51  # the bottom-right cell 0.2 grey
    grid = to_latent_grid(Image.fromarray(mask))
    assert grid.shape == (1, 2, 2)
    assert torch.allclose(grid, torch.tensor([[[0.5, 0.0], [0.0, 0.2]]]), atol=1e-7)


@pytest.mark.parametrize("kind, message", [
    ("missing", "{folder}/b.png: its mask b_mask.png is missing"),
    ("size", "{folder}/b_mask.png: the mask is 100x50 but its image b.png is 128x64; a mask must have its "
             "image's size"),
    ("alpha", "{folder}/b.png: has no alpha channel, but its source sets mask_from_alpha: true"),
])
def test_bad_masks_stop_at_start_up_naming_the_file(tmp_path, kind, message):
    folder = tmp_path / "img"
    write_pair(folder, "a")
    write_pair(folder, "b", mask_size=(100, 50) if kind == "size" else None)
    if kind == "missing":
        (folder / "b_mask.png").unlink()
    cfg = masked_config(tmp_path, folder, **({"mask_from_alpha": True} if kind == "alpha" else {}))
    with pytest.raises(DataError) as e:
        data_lib.build_data(cfg, seed=1, num_processes=1)
    assert message.format(folder=folder) in str(e.value)


# --------------------------------------------------------------------------- the loss

def test_all_ones_mask_and_unit_weights_give_the_unmasked_loss_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    plain = masked_mse(prediction, target)
    assert torch.equal(plain, torch.nn.functional.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3)))
    assert torch.equal(masked_mse(prediction, target, torch.ones(3, 1, 8, 8)), plain)
    out = StepOutput(prediction, target, torch.tensor([10, 500, 900]), *[None] * 3, plain)
    scheduler = build_tiny_sdxl(0).noise_scheduler()
    for weighting in (LossWeighting("epsilon"), LossWeighting("epsilon", snr_gamma=5.0)):
        base = weighted_loss(out, scheduler, weighting, 1)
        assert torch.equal(weighted_loss(out, scheduler, weighting, 1, torch.ones(3)), base)
    weighted = weighted_loss(out, scheduler, LossWeighting("epsilon"), 1, torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(weighted, (plain[0] + 0.5 * plain[2]) / 3)  # the mean stays over the batch size


def test_half_mask_changes_only_the_masked_halfs_gradient():
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(1, 4, 8, 8, generator=generator)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    grads = []
    for m in (None, mask):
        prediction = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
        masked_mse(prediction, target, m).sum().backward()
        grads.append(prediction.grad)
    plain, masked = grads
    assert torch.equal(masked[..., 4:], torch.zeros(1, 4, 8, 4))  # the ignored half gets no gradient
    # the kept half: d/dp [mean(mask * (p - t)^2) / mean(mask)] = 2 (p - t) / N / 0.5, twice the plain gradient
    assert torch.allclose(masked[..., :4], 2 * plain[..., :4], rtol=1e-6, atol=0)
    assert masked_mse(torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 8, 8)).item() == 0.0


def test_predict_with_an_all_ones_mask_equals_predict_without(tmp_path, sample_dir):
    parts = build_tiny_sdxl(0)
    cfg = tiny_config(tmp_path, sample_dir)
    train_set, _ = data_lib.build_data(cfg, seed=1, num_processes=1)
    batch = data_lib.collate([train_set[i] for i in range(2)])
    losses = []
    for with_mask in (False, True):
        h, w = batch["pixels"].shape[-2:]
        b = {**batch, **({"mask": torch.ones(2, 1, h // 8, w // 8)} if with_mask else {})}
        out = predict(parts.unet, parts.vae, (parts.tokenizer, parts.tokenizer_2),
                      (parts.text_encoder, parts.text_encoder_2), parts.noise_scheduler(), b,
                      torch.Generator().manual_seed(3))
        losses.append(out.loss_per_sample)
    assert torch.equal(losses[0], losses[1])


def test_latent_cache_stores_the_mask_beside_the_latent(tmp_path):
    write_pair(tmp_path / "img", "a")
    cfg = masked_config(tmp_path, tmp_path / "img")
    train_set, _ = data_lib.build_data(cfg, seed=1, num_processes=1)
    live = train_set[0]["mask"]
    vae = build_tiny_sdxl(0).vae.eval()
    report = latent_cache.prepare_latent_cache(train_set, vae, tmp_path / "latents", "fp32", 1)
    assert torch.equal(latent_cache.read_tensors(report.entries[0])["mask"], live)
    cached = train_set.with_entries(data_lib.CachedEntries(latents=tuple(report.entries)))
    assert torch.equal(cached[0]["mask"], live) and "pixels" not in cached[0]
    unmasked = data_lib.CaptionedImageDataset(train_set.records, lambda r: (64, 64))
    assert latent_cache.latent_keys(unmasked, "vae", torch.float32) != latent_cache.latent_keys(train_set, "vae",
                                                                                                 torch.float32)


def write_striped_mask_pair(folder, mask: Image.Image):
    """A 64x64 image with caption, and `mask` (64x64) as its mask file."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(folder / "a.png")
    (folder / "a.txt").write_text("noise")
    mask.save(folder / "a_mask.png")


def stripes(values, dtype) -> np.ndarray:
    """64x64, `values[k]` in columns 16k..16k+15: two whole latent columns each."""
    return np.repeat(np.array(values, dtype=dtype), 16)[None].repeat(64, axis=0)


@pytest.mark.parametrize("byte_order", ["<u2", ">u2"])
def test_16_bit_grey_mask_files_are_scaled_like_images_not_clipped(tmp_path, byte_order):
    # the values of issue 28: PIL's convert("L") clipped 200 to weight 200/255 = 0.784 and 30000 (46 % grey) to 1;
    # scaled as images are (x >> 8), 200 -> 0/255 and 30000 -> 117/255
    write_striped_mask_pair(tmp_path / "img", Image.fromarray(stripes([0, 200, 30000, 65535], byte_order)))
    with Image.open(tmp_path / "img" / "a_mask.png") as written:
        assert written.mode == "I;16"  # a real 16-bit grey PNG (PNG cannot hold modes I or F: tested below)
    train_set, _ = data_lib.build_data(masked_config(tmp_path, tmp_path / "img"), seed=1, num_processes=1)
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 117 / 255, 117 / 255, 1.0, 1.0]).expand(1, 8, 8)
    assert torch.allclose(train_set[0]["mask"], expected, rtol=0, atol=1e-6)  # float32 means of equal values


def test_32_bit_integer_and_float_masks_are_scaled_like_images():
    integer = Image.fromarray(np.array([[-5, 200, 30000, 65535, 70000]], dtype=np.int32))
    floats = Image.fromarray(np.array([[-1.0, 0.25, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert (integer.mode, floats.mode) == ("I", "F")
    assert np.asarray(masks.mask_weights(integer)).tolist() == [[0, 0, 117, 255, 255]]
    assert np.asarray(masks.mask_weights(floats)).tolist() == [[0, 64, 128, 255, 0]]


def test_a_mask_files_own_alpha_weighs_its_grey(tmp_path):
    # white colour everywhere, alpha 0 / 51 / 128 / 255 by column: weights alpha / 255 (transparent = not trained)
    alpha = stripes([0, 51, 128, 255], np.uint8)
    rgba = np.dstack([np.full((64, 64, 3), 255, dtype=np.uint8), alpha])
    write_striped_mask_pair(tmp_path / "img", Image.fromarray(rgba))
    train_set, _ = data_lib.build_data(masked_config(tmp_path, tmp_path / "img"), seed=1, num_processes=1)
    expected = torch.tensor([0, 0, 51, 51, 128, 128, 255, 255], dtype=torch.float32).div(255).expand(1, 8, 8)
    assert torch.allclose(train_set[0]["mask"], expected, rtol=0, atol=1e-6)
    # grey 200 under alpha 128 weighs round(200 * 128 / 255) = 100; an opaque alpha changes nothing
    grey_alpha = Image.fromarray(np.array([[[200, 128], [200, 255], [37, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(masks.mask_weights(grey_alpha)).tolist() == [[100, 200, 37]]
    opaque = np.dstack([stripes([0, 60, 200, 255], np.uint8)] * 3 + [np.full((64, 64), 255, dtype=np.uint8)])
    assert np.array_equal(np.asarray(masks.mask_weights(Image.fromarray(opaque))), stripes([0, 60, 200, 255],
                                                                                           np.uint8))


def test_a_wrong_size_in_the_image_index_does_not_fail_the_mask_check(tmp_path, caplog):
    # the mask check compares the mask with the image's size: an index entry of 4096x64 for a 128x64 image made it
    # "the mask is 128x64 but its image is 4096x64" at every start-up; the header decides, the entry is corrected
    write_pair(tmp_path / "img", "a")
    cfg = masked_config(tmp_path, tmp_path / "img")
    data_lib.build_data(cfg, seed=1, num_processes=1)
    index_file = tmp_path / "image_index.json"
    stored = json.loads(index_file.read_text())
    (key, entry), = stored["images"].items()
    stored["images"][key] = [*entry[:2], 4096, *entry[3:]]
    index_file.write_text(json.dumps(stored))
    with caplog.at_level("WARNING"):
        train_set, _ = data_lib.build_data(cfg, seed=1, num_processes=1)
    assert (train_set.records[0].width, train_set.records[0].height) == (128, 64)
    assert "4096x64 in the index, 128x64 in the file; corrected from the files" in caplog.text
    assert json.loads(index_file.read_text())["images"][key][2:4] == [128, 64]
