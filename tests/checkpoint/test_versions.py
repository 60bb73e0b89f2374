"""format_version: the saved config and trainer_state.pt carry one; an old state is migrated, a newer one refused."""

import json
import shutil

import pytest
import torch
from conftest import ROOT, tiny_config

from sdxl_ff.checkpoint.checkpointer import ResumeError, load_state
from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import FORMAT_VERSION, load_config, to_dict

# trainer_state.pt of a 2-step run (builtin:tiny-sdxl, adamw8bit, the repo's data/images, seed 1234) written by
# sdxl-ff before format_version existed (commit fb705d3), with its optimizer moments dropped to keep it small
OLD_STATE = ROOT / "tests" / "reference" / "trainer_state_v1.pt"


def test_an_unversioned_state_is_read_as_the_current_format(tmp_path):
    raw = torch.load(OLD_STATE, weights_only=False)
    assert "format_version" not in raw and raw["global_step"] == 2 and len(raw["losses"]) == 2
    state = load_state(OLD_STATE)
    assert state["format_version"] == FORMAT_VERSION == 2
    assert {k: v for k, v in state.items() if k in raw} .keys() == raw.keys()
    assert state["losses"] == raw["losses"] and state["sampler"] == raw["sampler"]


def test_a_newer_state_is_refused_with_both_versions(tmp_path):
    state = torch.load(OLD_STATE, weights_only=False)
    torch.save({**state, "format_version": FORMAT_VERSION + 1}, tmp_path / "trainer_state.pt")
    with pytest.raises(ResumeError, match=f"format_version {FORMAT_VERSION + 1}; this version reads "
                                          f"format_version {FORMAT_VERSION} and older"):
        load_state(tmp_path / "trainer_state.pt")


def test_the_saved_config_carries_its_version_and_loads_again(tmp_path):
    cfg = load_config(None, ["training.num_steps=3", "run.name=v", "model.train_text_encoder_1=false"])
    saved = to_dict(cfg)
    assert next(iter(saved)) == "format_version" and saved["format_version"] == FORMAT_VERSION
    (tmp_path / "sdxl_ff_config.json").write_text(json.dumps(saved))
    assert to_dict(load_config(tmp_path / "sdxl_ff_config.json")) == saved
    (tmp_path / "newer.json").write_text(json.dumps({**saved, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ConfigError, match=f"format_version: {FORMAT_VERSION + 1}: this config was written by a "
                                          f"newer sdxl-ff \\(this version reads format_version up to 2\\)"):
        load_config(tmp_path / "newer.json")
    (tmp_path / "odd.json").write_text(json.dumps({**saved, "format_version": "2"}))
    with pytest.raises(ConfigError, match='format_version: "2" is not a format version'):
        load_config(tmp_path / "odd.json")


def test_a_run_resumes_from_the_old_state(tmp_path, tiny_dir):
    """The migrated state goes through the real restore: step, losses and data position continue."""
    folder = tmp_path / "old"
    shutil.copytree(tiny_dir, folder)
    shutil.copy(OLD_STATE, folder / "trainer_state.pt")
    old = torch.load(OLD_STATE, weights_only=False)
    from train_sdxl_ff import train
    summary = train(tiny_config(tmp_path, ROOT / "data" / "images", steps=3,
                                **{"training.resume_from": str(folder)}))
    assert summary["global_step"] == 3 and summary["losses"][:2] == old["losses"] and len(summary["losses"]) == 3
    state = torch.load(tmp_path / "out" / "test" / "trainer_state.pt", weights_only=False)
    assert state["format_version"] == FORMAT_VERSION and state["global_step"] == 3
    assert state["batch_in_epoch"] == old["batch_in_epoch"] + 1  # one more batch of the same epoch order
    # written before states named their optimizer's implementation: bitsandbytes' AdamW8bit, which still steps
    # fp32 weights (without its per-tensor wait), so the state maps exactly; the new state names it
    assert "optimizer_impl" not in old["fingerprint"]
    assert state["fingerprint"]["optimizer_impl"] == "bitsandbytes AdamW8bit"


@pytest.mark.parametrize("kind, overrides", [
    ("adamw8bit per parameter", {"model.use_bf16": "true", "model.full_bf16": "true"}),
    ("adamw per parameter", {"optimizer.type": "adamw", "training.fused_backward": "true",
                             "training.max_grad_norm": "null"}),
])
def test_a_per_parameter_state_from_before_is_refused_in_one_line(tmp_path, tiny_dir, kind, overrides):
    """full_bf16 / fused_backward used to keep one optimizer per tensor (state keyed by parameter name); this
    sdxl-ff steps one optimizer, which cannot load it: one line naming the file and how to go on from the weights."""
    folder = tmp_path / "old"
    shutil.copytree(tiny_dir, folder)
    old = torch.load(OLD_STATE, weights_only=False)
    torch.save({**old, "fingerprint": {**old["fingerprint"], "optimizer": kind}}, folder / "trainer_state.pt")
    from train_sdxl_ff import train
    with pytest.raises(ResumeError) as info:
        train(tiny_config(tmp_path, ROOT / "data" / "images", steps=3,
                          **{"training.resume_from": str(folder), **overrides}))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{folder}/trainer_state.pt: its optimizer state comes from one ")
    assert message.endswith(f"start a new run with --set model.id={folder} (without training.resume_from)")
    assert not (tmp_path / "out" / "test" / "trainer_state.pt").exists()
