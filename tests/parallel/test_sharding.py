"""training.sharding "fsdp2": two CPU processes (gloo) hold half the training bytes each and train what one process
trains; checkpoints resume bit for bit; the saved model equals a single-process run's in keys and dtypes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_in_process, tiny_config, tiny_overrides
from helpers import relative_difference
from PIL import Image
from safetensors.torch import load_file
from two_process_runs import BF16, COMMON, EVALS, IMAGES, SHARDED

import converttosdxl
from sdxl_ff.checkpoint.checkpointer import SHARDS_NAME, Checkpointer, ResumeError, check_sharding
from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.eval.evaluation import load_prompts, run_eval
from sdxl_ff.export.export_step import converter_command
from sdxl_ff.model.parts import build_tiny_sdxl, load_parts
from sdxl_ff.optim.optimizers import set_group_lr
from sdxl_ff.parallel.fsdp2 import local_bytes, mixed_precision_policy, planned_bytes, tensor_bytes

FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
         "text_encoder_2": "model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}

def whole_bytes() -> dict[str, int]:
    """What one process holds for the same modules and optimizer after a step, measured the same way."""
    parts = build_tiny_sdxl(0)
    params = [*parts.unet.parameters(), *parts.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return local_bytes(params, optimizer)


def test_fsdp2_matches_one_process_halves_the_bytes_and_resumes_exactly(tmp_path, two_process_runs):
    one_args = {**COMMON, "training.batch_size": "4", "export.save_single_file": "true"}
    one = run_in_process(*tiny_overrides(tmp_path / "one", IMAGES, steps=4, **{
        **one_args, "export.save_single_file": "false"}))
    assert one.returncode == 0, one.stderr[-3000:]
    # its single file: the converter command the trainer would run, in this process (no second Python start)
    export = tiny_config(tmp_path / "one", IMAGES, steps=4, **one_args).export
    Path(export.checkpoint_path).parent.mkdir(parents=True)
    assert converttosdxl.main(converter_command(export, tmp_path / "one" / "out" / "test")[2:]) == 0
    first = two_process_runs.output("fsdp2") / "checkpoints" / "step-0000002"
    prompts = two_process_runs.folder / "prompts.json"
    evals = {**EVALS, "eval.prompts_path": str(prompts)}
    ranks, names = two_process_runs.ranks, ("fsdp2-refused", "fsdp2", "fsdp2-resumed", "fsdp2-8bit")
    log = "".join(two_process_runs.log(name) for name in names)  # what this test's runs printed (without bf16's)

    # a refused combination: the same one-line problem on both processes, before anything starts
    stderr = "".join(two_process_runs.err[name] for name in names)
    refusals = [line for line in stderr.splitlines() if "training.sharding is \"fsdp2\" but" in line]
    assert len(refusals) == 2 and refusals[0] == refusals[1], refusals
    assert "training.sharding is \"fsdp2\" but training.fused_backward is true: FSDP2 reduce-scatters" in refusals[0]
    assert two_process_runs.codes("fsdp2-refused") == [2, 2]
    assert not (two_process_runs.folder / "fsdp2-refused" / "out").exists()

    # the same training as one process with the same global batch (summation order only)
    out_one, out_two = tmp_path / "one" / "out" / "test", two_process_runs.output("fsdp2")
    base = build_tiny_sdxl(0)
    for part in ("unet", "text_encoder"):
        a, b = load_file(out_one / part / FILES[part]), load_file(out_two / part / FILES[part])  # the EMA weights
        assert relative_difference(a, b, getattr(base, part).state_dict()) < 1e-3, part
    losses_one = torch.load(out_one / "trainer_state.pt", weights_only=False)["losses"]
    state_two = torch.load(out_two / "trainer_state.pt", weights_only=False)
    assert all(abs(x - y) < 1e-5 for x, y in zip(losses_one, state_two["losses"], strict=True))
    assert state_two["sharding"] == {"type": "fsdp2", "world_size": 2} and state_two["ema_in_weights"]
    assert "training.sharding fsdp2: unet, text_encoder sharded over 2 processes" in log

    # each process holds about half of what one process holds (measured from its local shards)
    whole = whole_bytes()
    for rank in ranks:
        held = rank["fsdp2"]["bytes"]
        for kind in ("weights", "gradients", "optimizer"):
            assert 0.45 < held[kind] / whole[kind] < 0.56, (kind, held[kind], whole[kind])
    assert log.count("held by this process after the first step (measured)") == 3  # main process: 3 sharded runs

    # the saved model: the same files, keys and dtypes as one process's; written by the main process only
    for part, file in FILES.items():
        a, b = load_file(out_one / part / file), load_file(out_two / part / file)
        assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}, part
        if part in ("vae", "text_encoder_2"):  # frozen: written exactly as loaded
            assert all(torch.equal(a[k], b[k]) for k in a), part
    single_one = load_file(tmp_path / "one" / "out" / "safetensors" / "test.safetensors")
    single_two = load_file(two_process_runs.folder / "fsdp2" / "out" / "safetensors" / "test.safetensors")
    assert {k: v.dtype for k, v in single_one.items()} == {k: v.dtype for k, v in single_two.items()}
    assert ranks[0]["fsdp2"]["writes"] and not ranks[1]["fsdp2"]["writes"]  # rank 1 writes only its DCP shard file
    assert log.count("INFO saved ") == 3 and log.count("INFO checkpoint: ") == 1
    assert sorted(p.name for p in (first / SHARDS_NAME).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not list(out_two.rglob(".*.tmp"))
    assert not (two_process_runs.output("fsdp2-8bit") / "checkpoints").exists()  # no checkpoint: no folder for them
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(out_two, local_files_only=True)
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], load_file(out_two / "unet" / FILES["unet"])
                       ["conv_in.weight"])

    # stopped at step 2 and resumed on two processes: the same weights, EMA and losses to the last bit
    out_resumed = two_process_runs.output("fsdp2-resumed")
    state_resumed = torch.load(out_resumed / "trainer_state.pt", weights_only=False)
    assert state_resumed["losses"] == state_two["losses"]
    assert state_resumed["ema"]["num_updates"] == state_two["ema"]["num_updates"] == 4
    for part in ("unet", "text_encoder"):
        a, b = load_file(out_two / part / FILES[part]), load_file(out_resumed / part / FILES[part])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    # torchao's 8-bit AdamW on the shards (with gradient checkpointing): close to fp32 AdamW, and it learns
    out_8bit = two_process_runs.output("fsdp2-8bit")
    losses_8bit = torch.load(out_8bit / "trainer_state.pt", weights_only=False)["losses"]
    assert losses_8bit[-1] < 0.8 * losses_8bit[0], losses_8bit
    a, b = load_file(out_one / "unet" / FILES["unet"]), load_file(out_8bit / "unet" / FILES["unet"])
    assert relative_difference(a, b, base.unet.state_dict()) < 0.05
    assert "AdamW8bit (torchao 0.18.0, 8-bit state of each process's shard)" in log
    # its final eval rendered the gathered EMA weights: exactly what the saved (EMA) folder renders
    during = np.asarray(Image.open(out_8bit / "eval" / "final" / "grid.png"))
    cfg = tiny_config(two_process_runs.folder / "fsdp2-8bit", IMAGES, steps=4, **{**COMMON, **evals})
    again = run_eval(load_parts(str(out_8bit)), cfg.eval, load_prompts(str(prompts), 64, 64), tmp_path / "again")
    assert np.array_equal(during, np.asarray(again.grid))
    assert (out_resumed / "eval" / "live" / "step_4" / "grid.png").is_file()
    held8, held32 = ranks[0]["fsdp2-8bit"]["bytes"], ranks[0]["fsdp2"]["bytes"]
    assert held8["optimizer"] < 0.5 * held32["optimizer"]  # the tiny model has many tensors too small for 8 bits

    # another number of processes, or no sharding, cannot continue the sharded state: refused by name
    for extra, message in [({}, "training.sharding is \"fsdp2\" but this run has 1 process"),
                           ({"training.sharding": "none"}, "written with training.sharding 'fsdp2'")]:
        refused = run_in_process(*tiny_overrides(tmp_path / "again", IMAGES, steps=6, **{
            **SHARDED, "training.resume_from": str(first), **extra}))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]


def test_one_process_is_refused_before_the_model_loads(tmp_path):
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=1, **SHARDED))
    assert proc.returncode == 2
    assert "training.sharding is \"fsdp2\" but this run has 1 process" in proc.stderr
    assert "training unet" not in proc.stderr and not (tmp_path / "out" / "test" / "unet").exists()


def test_shards_of_an_interrupted_save_are_removed(tmp_path):
    checkpointer = Checkpointer(tmp_path, None)
    for name in (".step-0000002.shards.tmp", ".final.shards.tmp", "step-0000001"):
        (checkpointer.root / name).mkdir(parents=True)
    checkpointer.remove_leftovers()  # at start-up (kill -9 while the processes wrote their shards)
    assert [p.name for p in checkpointer.root.iterdir()] == ["step-0000001"]


def test_a_sharded_state_resumes_only_sharded_on_as_many_processes():
    saved = {"type": "fsdp2", "world_size": 2}
    check_sharding(saved, "fsdp2", 2, "state.pt")
    check_sharding(None, "none", 4, "state.pt")  # an unsharded state: any number of processes (DDP)
    with pytest.raises(ResumeError, match="written by 2 processes .* but this run has 4.*--num_processes 2"):
        check_sharding(saved, "fsdp2", 4, "state.pt")
    with pytest.raises(ResumeError, match="training.sharding is 'fsdp2', but the state state.pt was written with "
                                          "training.sharding 'none'"):
        check_sharding(None, "fsdp2", 2, "state.pt")


@pytest.mark.parametrize("key, value", [("training.fused_backward", "true"), ("model.full_bf16", "true"),
                                        ("model.use_torch_compile", "true"), ("validation.enabled", "true"),
                                        ("optimizer.type", "adafactor")])
def test_combinations_that_cannot_shard_are_refused(key, value):
    overrides = ["training.sharding=fsdp2", f"{key}={value}", "training.num_steps=1", "run.name=x",
                 "model.use_bf16=true", "training.max_grad_norm=null", "validation.split=0.5",
                 "model.train_text_encoder_1=false", "validation.every_n_steps=5"]
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert f"training.sharding is \"fsdp2\" but {key}" in str(error.value)
    load_config(None, [o for o in overrides if not o.startswith("training.sharding")])  # fine unsharded


def test_mixed_precision_policy_and_bytes():
    bf16 = mixed_precision_policy("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy("no").param_dtype is None  # fp32 throughout
    sizes = [4096 * 3, 100]
    assert planned_bytes(sizes, "adamw", 2) == {"weights": 4 * 12388 // 2, "gradients": 4 * 12388 // 2,
                                                "optimizer": (8 * 12388 + 8) // 2}
    from torchao.optim.subclass_8bit import OptimState8bit
    state = OptimState8bit.zeros((4096,), True, 256, "cpu")
    assert tensor_bytes(state) == 4096 + 4 * 16 + 4 * 256  # codes, one scale per block, the 256-entry map
    group = {"lr": torch.tensor(1.0)}
    set_group_lr(group, 0.25)
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].item() == 0.25
    plain = {"lr": 1.0}
    set_group_lr(plain, 0.5)
    assert plain["lr"] == 0.5


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_plan_divides_the_sharded_rows_by_the_processes():
    from sdxl_ff.plan.planner import GiB, MemoryPlan
    from sdxl_ff.plan.report import gathered_bytes, per_process
    rows = [("weights (trained, fp32)", 8 * GiB, "computed"), ("gradients alive at the peak", 8 * GiB, "traced"),
            ("optimizer state (adamw8bit)", 4 * GiB, "computed"), ("activations + temporaries", 3 * GiB, "traced"),
            ("EMA (fp32 copy)", 8 * GiB, "computed"), ("vae (frozen, on the device)", GiB, "computed")]
    unet = build_tiny_sdxl(0).unet
    gathered = gathered_bytes(dict(unet.config), 2)
    plan = per_process(MemoryPlan(rows, 32 * GiB, GiB, {}), 4, gathered)
    assert [n for _, n, _ in plan.rows] == [2 * GiB, 2 * GiB, GiB, 3 * GiB, 2 * GiB, GiB, gathered]
    assert plan.peak_bytes == 11 * GiB + gathered and plan.settings["processes"] == 4
    from sdxl_ff.model.parts import block_types
    blocks = sorted(sum(p.numel() for p in m.parameters()) for m in unet.modules() if isinstance(m, block_types()))
    own = sum(p.numel() for p in unet.parameters()) - sum(blocks)
    assert gathered == 2 * (own + blocks[-1] + blocks[-2])


def test_bf16_mixed_precision_with_checkpointing_follows_one_process(tmp_path, two_process_runs):
    """model.use_bf16 under fsdp2: blocks compute with bf16 copies of fp32 shards (MixedPrecisionPolicy) inside
    bf16 autocast, gradients reduce in fp32; the saved weights stay fp32 and follow one bf16 process closely."""
    one = run_in_process(*tiny_overrides(tmp_path / "one", IMAGES, steps=2, **{**BF16, "training.batch_size": "4"}))
    assert one.returncode == 0, one.stderr[-3000:]
    two = two_process_runs.log("fsdp2-bf16")  # the run on two processes
    assert two_process_runs.codes("fsdp2-bf16") == [0, 0], two[-3000:]
    assert "precision: bf16 autocast" in two_process_runs.err["fsdp2-bf16"]
    a = load_file(tmp_path / "one" / "out" / "test" / "unet" / FILES["unet"])
    b = load_file(two_process_runs.output("fsdp2-bf16") / "unet" / FILES["unet"])
    assert all(v.dtype == torch.float32 for v in b.values())
    difference = relative_difference(a, b, build_tiny_sdxl(0).unet.state_dict())
    # bf16 rounding (all of a block's ops run on bf16 weights, and gradients are bf16 before their fp32 reduction),
    # which Adam's first steps magnify where a gradient is near zero; another training would differ by ~1
    assert difference < 0.25, difference
    losses = [torch.load(folder / "out" / "test" / "trainer_state.pt", weights_only=False)["losses"]
              for folder in (tmp_path / "one", two_process_runs.folder / "fsdp2-bf16")]
    assert all(abs(x - y) < 0.02 * x for x, y in zip(*losses, strict=True)), losses


def test_a_misspelt_sharding_names_the_choices():
    message = r'training\.sharding: expected one of "none", "fsdp2", got "fsdp".*did you mean .fsdp2.'
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["training.sharding=fsdp"])
