"""The suite's trainer runs on two processes (accelerate launch, gloo on the CPU), all in one launch per session.

Each launch starts three Pythons that import torch, diffusers and transformers (seconds of CPU each) and a process
group, so test_multigpu.py, test_sharding.py and test_validation.py share one: they assert on its runs through the
`two_process_runs` fixture (conftest.py). Under pytest-xdist the first worker to ask launches the runs and the
others read what it left.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from conftest import ROOT, tiny_overrides
from filelock import FileLock
from helpers import launch_two

# Several trainer runs in one launch of two processes: one start-up of Python, its imports and the process group
# for all of them (seconds of CPU each). Each process records per run its exit code, what train() returned, which
# model files it wrote and, where a run asks for it, its own UNet weights at the end (only rank 0 saves a model).
# Between runs all processes meet: the main process may rename a folder first, and it prints a marker line on
# stdout and stderr, so each run's output can be read apart; the processes write whole lines, which keeps two
# processes' lines apart when both print at once (a refusal on both). The first run starts the process group (with the
# trainer's own wait timeout); accelerate's per-process state is reset before each run, as run_in_process does.
RUN_MARKER = "=== test run {} ==="
MULTI_RUN_SPY = f"""
import io, json, os, sys
class Lines(io.TextIOBase):
    # whole lines in one write(2): both processes write into one pipe, and print() writes a line's end apart,
    # so the other process's output could land inside a line
    encoding = "utf-8"
    def __init__(self, stream):
        self.stream, self.pending = stream, ""
    def write(self, text):
        head, newline, self.pending = (self.pending + text).rpartition("\\n")
        if newline:
            os.write(self.stream.fileno(), (head + newline).encode())
        return len(text)
    def flush(self):
        if self.pending:
            os.write(self.stream.fileno(), self.pending.encode())
            self.pending = ""
    def fileno(self):
        return self.stream.fileno()
    def isatty(self):
        return False
sys.stdout, sys.stderr = Lines(sys.stdout), Lines(sys.stderr)
sys.path.insert(0, {str(ROOT)!r})
import safetensors.torch, torch
import train_sdxl_ff
import sdxl_ff.parallel.strategy as strategy
from accelerate.state import AcceleratorState, GradientState
from sdxl_ff.model.trainables import plain_module
runs, folder, rank = json.loads(open(sys.argv[1]).read()), sys.argv[2], int(os.environ["RANK"])
results, writes, prepared = {{}}, [], {{}}
def spying(function, name):
    def spy(obj, target, *args, **kwargs):
        if isinstance(target, (str, bytes)) or hasattr(target, "__fspath__"):  # a file, not DCP's in-memory buffer
            writes.append(name)
        return function(obj, target, *args, **kwargs)
    return spy
safetensors.torch.save_file = spying(safetensors.torch.save_file, "safetensors")
torch.save = spying(torch.save, "torch.save")
train, prepare = train_sdxl_ff.train, strategy.prepare
def keep(*args, **kwargs):
    summary = train(*args, **kwargs)
    results[run["name"]].update(bytes=summary.get("bytes_per_process"), losses=summary["losses"])
    return summary
def keep_unet(accelerator, trainables, optimizer):
    modules, optimizer = prepare(accelerator, trainables, optimizer)
    prepared["unet"] = modules[0]
    return modules, optimizer
train_sdxl_ff.train, strategy.prepare = keep, keep_unet
def meet():  # everything the last run printed is out before the next marker
    sys.stdout.flush()
    sys.stderr.flush()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
for run in runs:
    meet()
    if rank == 0:
        if run.get("rename"):
            os.rename(*run["rename"])
        for stream in (sys.stdout, sys.stderr):
            print("\\n" + {RUN_MARKER!r}.format(run["name"]), file=stream, flush=True)
    meet()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    writes.clear()
    prepared.clear()
    results[run["name"]] = {{}}
    code = train_sdxl_ff.main(run["argv"])
    results[run["name"]].update(code=code, writes=sorted(set(writes)))
    if run.get("save_unet"):
        weights = {{k: v.contiguous() for k, v in plain_module(prepared["unet"]).state_dict().items()}}
        safetensors.torch.save_file(weights, f"{{folder}}/{{run['name']}}.rank{{rank}}.safetensors")
meet()
open(f"{{folder}}/rank{{rank}}.json", "w").write(json.dumps(results))
"""


@dataclass
class Launch:
    """What one launch of several runs left: each run's stdout and stderr, and what each process recorded."""
    folder: Path
    out: dict[str, str]
    err: dict[str, str]
    ranks: list[dict]

    def log(self, name: str) -> str:
        """A run's stdout + stderr, as `launch_two(...).stdout + .stderr` would read for that run alone."""
        return self.out[name] + self.err[name]

    def codes(self, name: str) -> list[int]:
        """Each process's exit code of a run (what main() returned), main process first."""
        return [rank[name]["code"] for rank in self.ranks]

    def output(self, name: str) -> Path:
        """A run's training.output_dir (tiny_overrides below <folder>/<name>)."""
        return self.folder / name / "out" / "test"

    def save(self, path: Path) -> None:
        """Write it to `path` for the other pytest-xdist workers (complete or not at all: a rename)."""
        path.with_suffix(".tmp").write_text(json.dumps({**asdict(self), "folder": str(self.folder)}))
        os.replace(path.with_suffix(".tmp"), path)

    @classmethod
    def read(cls, path: Path) -> Launch:
        saved = json.loads(path.read_text())
        return cls(**{**saved, "folder": Path(saved["folder"])})


def by_run(text: str, names: list[str]) -> dict[str, str]:
    """The output of each run (what came before the first marker, a process's start-up, goes with the first)."""
    head, *rest = re.split("\n?" + re.escape(RUN_MARKER).replace(r"\{\}", r"(\S+)") + "\n", text)
    assert rest[::2] == names, (rest[::2], text[-3000:])
    parts = dict(zip(rest[::2], rest[1::2], strict=True))
    parts[names[0]] = head + parts[names[0]]
    return parts


def launch_runs(folder: Path, runs: list[dict], timeout: int = 900) -> Launch:
    """Run `runs` ({"name", "argv", optional "rename": [from, to] before it, "save_unet": true}) one after the
    other in one launch of two processes (MULTI_RUN_SPY)."""
    (folder / "spy.py").write_text(MULTI_RUN_SPY)
    (folder / "runs.json").write_text(json.dumps(runs))
    proc = launch_two(str(folder / "runs.json"), str(folder), timeout=timeout, script=folder / "spy.py")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    names = [run["name"] for run in runs]
    return Launch(folder, by_run(proc.stdout, names), by_run(proc.stderr, names),
                  [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)])


IMAGES = ROOT / "data" / "images"

# test_multigpu.py (DDP)
TWO = {"optimizer.type": "adamw", "model.train_text_encoder_1": "true", "training.lr_text_encoder_1": "1e-4",
       "training.checkpoint_every": "2", "training.log_every": "1"}
SEEDED = {"optimizer.type": "adamw", "model.train_text_encoder_2": "true", "training.lr_text_encoder_2": "1e-4",
          "model.use_ema": "true", "model.ema_decay": "0.5", "training.ema_update_every": "1",
          "training.checkpoint_every": "2"}

# test_sharding.py (training.sharding "fsdp2"). Trained in every run: the UNet and text encoder 1 (whose last layer
# gets no gradient: SDXL reads the penultimate one), with a per-shard EMA; one process with batch 4 or two with
# batch 2 each.
COMMON = {"optimizer.type": "adamw", "model.train_text_encoder_1": "true", "training.lr_text_encoder_1": "1e-4",
          "model.use_ema": "true", "model.ema_decay": "0.5", "training.ema_update_every": "1",
          "training.log_every": "1", "training.max_grad_norm": "1.0"}
SHARDED = {**COMMON, "training.sharding": "fsdp2", "training.batch_size": "2"}
PROMPTS = [{"prompt": "a red circle", "seed": 5, "height": 64, "width": 64}]
EVALS = {"eval.use_ema": "true", "eval.backend": "kdiffusion", "eval.num_inference_steps": "2"}
BF16 = {"model.use_bf16": "true", "model.use_gradient_checkpointing": "true", "training.log_every": "1",
        "optimizer.type": "adamw", "model.train_text_encoder_1": "true", "training.lr_text_encoder_1": "1e-4"}

# test_validation.py
VALIDATED = {"validation.enabled": "true", "validation.split": "0.34", "validation.every_n_steps": "5"}


def suite_runs(tmp: Path) -> list[dict]:
    """The runs, each writing below tmp/<its name>. "seed" goes first: it starts the process group, whose wait
    timeout it logs. The two refused runs go last."""
    seed_checkpoint = tmp / "seed" / "out" / "test" / "checkpoints" / "step-0000002"
    fsdp2_checkpoint = tmp / "fsdp2" / "out" / "test" / "checkpoints" / "step-0000002"
    (tmp / "prompts.json").write_text(json.dumps(PROMPTS))
    evals = {**EVALS, "eval.prompts_path": str(tmp / "prompts.json")}
    runs = {
        # test_multigpu.py::test_random_seed_text_encoder_2_and_ema_on_two_processes_match_one
        "seed": ({}, tiny_overrides(tmp / "seed", IMAGES, steps=3, **{
            **SEEDED, "training.batch_size": "2", "training.seed": "null"})),
        # resumed from a checkpoint caught between the two renames of a folder swap
        "seed-resumed": ({"rename": [str(seed_checkpoint), str(seed_checkpoint.with_name(".step-0000002.old"))]},
                         tiny_overrides(tmp / "seed-resumed", IMAGES, steps=3, **{
                             **SEEDED, "training.batch_size": "2", "training.seed": "null",
                             "training.resume_from": str(seed_checkpoint)})),
        # test_multigpu.py::test_two_processes_match_one_and_write_once
        "ddp": ({}, tiny_overrides(tmp / "ddp", IMAGES, steps=4, **{**TWO, "training.batch_size": "2"})),
        # test_multigpu.py::test_full_bf16_replicas_stay_identical: each process's own UNet is saved
        "full-bf16": ({"save_unet": True}, tiny_overrides(tmp / "full-bf16", IMAGES, steps=4, **{
            "model.use_bf16": "true", "model.full_bf16": "true", "optimizer.type": "adamw",
            "training.batch_size": "2"})),
        # test_sharding.py::test_fsdp2_matches_one_process_halves_the_bytes_and_resumes_exactly
        "fsdp2": ({}, tiny_overrides(tmp / "fsdp2", IMAGES, steps=4, **{
            **SHARDED, "training.checkpoint_every": "2", "export.save_single_file": "true"})),
        # with a live eval of the EMA at step 4: swapped into the shards, gathered, swapped out bit for bit
        "fsdp2-resumed": ({}, tiny_overrides(tmp / "fsdp2-resumed", IMAGES, steps=4, **{
            **SHARDED, "training.resume_from": str(fsdp2_checkpoint), **evals, "eval.live.enabled": "true",
            "eval.live.every_n_steps": "2"})),
        "fsdp2-8bit": ({}, tiny_overrides(tmp / "fsdp2-8bit", IMAGES, steps=4, **{
            **SHARDED, "optimizer.type": "adamw8bit", "model.use_gradient_checkpointing": "true", **evals,
            "eval.final.enabled": "true"})),
        # test_sharding.py::test_bf16_mixed_precision_with_checkpointing_follows_one_process
        "fsdp2-bf16": ({}, tiny_overrides(tmp / "fsdp2-bf16", IMAGES, steps=2, **{
            **BF16, "training.batch_size": "2", "training.sharding": "fsdp2"})),
        # test_validation.py::test_two_processes_report_what_one_does
        "validation": ({}, tiny_overrides(tmp / "validation", IMAGES, steps=1, **{
            **VALIDATED, "training.batch_size": "1"})),
        # test_multigpu.py::test_fused_backward_refused_on_several_processes
        "fused": ({}, tiny_overrides(tmp / "fused", IMAGES, steps=1, **{
            "training.fused_backward": "true", "training.max_grad_norm": "null"})),
        # test_sharding.py::test_fsdp2_matches_...: refused by the config check on both processes
        "fsdp2-refused": ({}, tiny_overrides(tmp / "fsdp2-refused", IMAGES, steps=4, **{
            **SHARDED, "training.fused_backward": "true", "training.max_grad_norm": "null"})),
    }
    return [{"name": name, "argv": argv, **options} for name, (options, argv) in runs.items()]


def launch_once(tmp_path_factory) -> Launch:
    """suite_runs in one launch: at once without pytest-xdist; with it, in the session's folder that its workers
    share, by the first worker to ask (under a file lock, as pytest-xdist's documentation does for session data)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp("two_processes")
        return launch_runs(folder, suite_runs(folder))
    shared = tmp_path_factory.getbasetemp().parent
    saved = shared / "two_processes.json"
    with FileLock(shared / "two_processes.lock"):
        if not saved.is_file():  # a fresh folder each try: a failed launch is tried again by the next test
            folder = Path(tempfile.mkdtemp(prefix="two_processes", dir=shared))
            launch_runs(folder, suite_runs(folder)).save(saved)
        return Launch.read(saved)
