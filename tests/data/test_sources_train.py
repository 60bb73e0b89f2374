"""Training from several sources: exact resume with repeats and masks; a loss_weight-0 source teaches nothing."""

import json

import numpy as np
import torch
from conftest import tiny_config
from helpers import assert_same_folder, weights
from PIL import Image

from sdxl_ff.data.synthetic import draw_shape
from train_sdxl_ff import train


def write_source(folder, count, width, height, seed, masks=False):
    """Noisy shapes with multi-part captions; with `masks`, a random rectangle mask per image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = np.asarray(draw_shape(["circle", "square"][i % 2], "red", "blue", width, height), dtype=np.int16)
        Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)).save(
            folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"shape {seed} {i}, red, blue, {'small' if i % 2 else 'large'}, flat")
        if masks:
            mask = np.zeros((height, width), dtype=np.uint8)
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            mask[top:top + height // 2, left:left + width // 2] = 255
            Image.fromarray(mask).save(folder / f"{i}_mask.png")
    return folder


def sources_config(tmp, name, entries, steps, **extra):
    values = {"data.image_dir": "null", "data.datasets": json.dumps(entries), "run.name": name,
              "training.batch_size": "2", **extra}
    return tiny_config(tmp, tmp, steps=steps, **values)


def test_resume_with_two_sources_repeats_and_masks_is_bit_exact(tmp_path):
    entries = [{"image_dir": str(write_source(tmp_path / "main", 4, 128, 128, 1)), "caption_keep_tokens": 1},
               {"image_dir": str(write_source(tmp_path / "masked", 2, 128, 64, 2, masks=True)), "masks": True,
                "repeats": 2, "loss_weight": 0.5, "caption_prefix": "sks"}]
    # 4 + 2x2 samples = 4 batches of 2 per epoch; 6 steps span two epochs, the stop at 3 is mid-epoch
    extra = {"data.caption_shuffle_prob": "0.5", "data.caption_dropout_prob": "0.2", "data.random_crop": "true",
             "training.checkpoint_every": "3", "training.snr_gamma": "5"}
    straight = train(sources_config(tmp_path, "straight", entries, 6, **extra))
    checkpoint = tmp_path / "out" / "straight" / "checkpoints" / "step-0000003"
    resumed = train(sources_config(tmp_path, "resumed", entries, 6, **extra,
                                   **{"training.resume_from": str(checkpoint)}))
    assert straight["losses"] == resumed["losses"] and len(straight["losses"]) == 6
    state = torch.load(tmp_path / "out" / "straight" / "trainer_state.pt", weights_only=False)
    assert state["epoch"] == 1 and len(state["sampler"]["order"]) == 4
    assert_same_folder(tmp_path / "out" / "straight", tmp_path / "out" / "resumed", 6)


def test_a_loss_weight_0_source_teaches_nothing(tmp_path):
    """Same seed and batches: with weight 0, what the extra source holds leaves every weight bit-identical."""
    main = str(write_source(tmp_path / "main", 4, 128, 128, 1))
    results = {}
    for name, seed, weight in (("zero_a", 2, 0.0), ("zero_b", 3, 0.0), ("counted", 2, 1.0)):
        other = str(write_source(tmp_path / f"other_{seed}", 2, 128, 128, seed))  # different pixels and captions
        entries = [{"image_dir": main, "name": "main"}, {"image_dir": other, "name": "other", "loss_weight": weight}]
        train(sources_config(tmp_path, name, entries, 3))
        results[name] = weights(tmp_path / "out" / name)
    a, b, counted = results["zero_a"], results["zero_b"], results["counted"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], counted[k]) for k in a)  # the same source at weight 1 does change them
