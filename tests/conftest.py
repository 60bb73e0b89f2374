"""Shared test set-up: one CPU thread, no hub, the repo root importable, helpers to run the CLI."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
# A suite started in the background of a script (`pytest &`, CI runners, nohup wrappers) inherits SIGINT ignored, and
# an ignored signal stays ignored across exec: the Ctrl-C tests' trainers would never see their SIGINT and hang. The
# tests stand in for a terminal, where Ctrl-C is never ignored, so their processes start with Python's own handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
ROOT = Path(__file__).resolve().parent.parent
INSPECTOR_VIEWPORT = {"width": 1400, "height": 900}  # the browser test's window: README's screenshot size
sys.path.insert(0, str(ROOT))

from sdxl_ff.data.synthetic import write_sample_set  # noqa: E402

pytest_plugins = ("pytester",)  # test_gpu_acceptance runs one cuda-tier test in-process


def cuda_tier_device() -> str | None:
    """Where the `cuda` tests run: "cuda" on a GPU, "cpu" when SDXL_FF_CUDA_TIER_DEVICE=cpu asks to check their
    own code without one, else None (skipped)."""
    if os.environ.get("SDXL_FF_CUDA_TIER_DEVICE") == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def pytest_runtest_setup(item) -> None:
    """`cuda` tests skip without a GPU, and fail instead when SDXL_FF_REQUIRE_CUDA=1 (a GPU acceptance run)."""
    if item.get_closest_marker("cuda") is None or cuda_tier_device() is not None:
        return
    if os.environ.get("SDXL_FF_REQUIRE_CUDA") == "1":
        pytest.fail("SDXL_FF_REQUIRE_CUDA=1 but torch sees no CUDA device (check nvidia-smi and CUDA_VISIBLE_DEVICES)",
                    pytrace=False)
    pytest.skip("needs a CUDA GPU (the cuda tier; benchmarks/gpu_acceptance.py runs it)")


# The longest test files, longest first (their summed durations in a 2-worker run, --durations=0). pytest-xdist
# hands out whole files in collection order; starting the longest first keeps one worker from running a long file
# alone at the end (longest-processing-time-first scheduling). Files not listed keep alphabetical order after these.
LONGEST_FIRST = ("test_multigpu.py", "test_benchmarks.py", "test_sharding.py", "test_planner.py", "test_console.py",
                 "test_gpu_acceptance.py", "test_export_train.py", "test_train.py", "test_resume.py",
                 "test_comfy_reference.py", "test_lock.py", "test_memory.py", "test_latent_cache.py",
                 "test_bench_startup.py", "test_cache_training.py", "test_convert_cli.py", "test_outputs.py",
                 "test_validation.py", "test_train_objectives.py", "test_export.py", "test_sample_cli.py")


def pytest_collection_modifyitems(items: list) -> None:
    """Longest files first (LONGEST_FIRST); a stable sort, so the order within a file is unchanged."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python train_sdxl_ff.py ARGS` as a user would; return the finished process."""
    return subprocess.run([sys.executable, str(ROOT / "train_sdxl_ff.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def reset_accelerate_state() -> None:
    """Forget accelerate's per-process state (private API, but what accelerate's own test cases call)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def no_accelerate_state_between_tests() -> Iterator[None]:
    """accelerate keeps one state (device, precision) per process; a test that trains with `train()` or builds its
    own Accelerator would leave it to the next test, which then depends on the order the tests run in."""
    yield
    reset_accelerate_state()


def run_in_process(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`train_sdxl_ff.main(ARGS)` in this process: what `run_cli` returns (exit code, our log lines in stderr)
    without a Python start-up and its imports (seconds per run).

    accelerate keeps one precision per process; its state is reset before each run, as accelerate's own
    test cases do between tests, so runs of any precision follow each other here. Use `run_cli` instead for
    signals and for checks that the console shows no library noise (pytest catches Python warnings
    in-process).
    """
    import train_sdxl_ff
    reset_accelerate_state()
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)  # pytest's own handlers on the root logger make basicConfig a no-op
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train_sdxl_ff.main(list(args))
    finally:
        os.chdir(previous)
        logging.getLogger().removeHandler(handler)
        reset_accelerate_state()  # the next test's own Accelerator may want another precision
    return subprocess.CompletedProcess(["train_sdxl_ff.py", *args], code, out.getvalue(), err.getvalue())


def pause_env(folder: Path, *points: str) -> dict[str, str]:
    """The environment that holds a process at each of `points` (runtime/pause.py): one FIFO per point in `folder`."""
    folder.mkdir(exist_ok=True)
    for point in points:
        os.mkfifo(folder / point)
    return {**os.environ, "SDXL_FF_PAUSE_AT": str(folder)}


def read_until_held(stream, point: str) -> list[str]:
    """The lines of a held process's output up to the one saying it is held at `point` (an error if it ends first)."""
    lines = []
    for line in stream:
        lines.append(line)
        if f"pause point {point}: held" in line:
            return lines
    raise AssertionError(f"the process ended before pause point {point}:\n{''.join(lines)[-3000:]}")


def read_rest(proc: subprocess.Popen, timeout: float) -> str:
    """The rest of `proc`'s output once it ends; fails the test (killing the process) if it is still running after
    `timeout` seconds, instead of hanging the suite on a process that missed its signal."""
    import threading
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        rest = proc.stdout.read()
    finally:
        timer.cancel()
    if proc.wait() == -signal.SIGKILL:
        pytest.fail(f"the process did not end within {timeout} s:\n{rest[-3000:]}", pytrace=False)
    return rest


def release(folder: Path, point: str) -> None:
    """Let the process held at `point` go on (it waits for this FIFO to be opened for writing and closed)."""
    with open(folder / point, "w"):
        pass


@contextlib.contextmanager
def small_disk_at(folder: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` MB mounted at `folder` (skips the test unless root may mount; fails instead in CI,
    where .ci/run sets SDXL_FF_REQUIRE_TMPFS=1)."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        if os.environ.get("SDXL_FF_REQUIRE_TMPFS") == "1":
            pytest.fail("SDXL_FF_REQUIRE_TMPFS=1 but a small tmpfs cannot be mounted here (needs root and mount)")
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)  # lazy: a failed write may hold a file open


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(tmp: Path, image_dir: Path, steps: int = 10, **extra: str) -> list[str]:
    """--set arguments for a short CPU run of the tiny model writing below `tmp`."""
    values = {"device": "cpu", "model.id": "builtin:tiny-sdxl", "model.use_bf16": "false",
              "run.name": "test", "run.output_root": str(tmp / "out"), "training.num_steps": str(steps),
              "training.lr_unet": "1e-3", "training.seed": "1234", "training.batch_size": "4",
              "training.grad_accum_steps": "1", "model.use_gradient_checkpointing": "false",
              "data.image_dir": str(image_dir), "data.size": "128", "data.num_workers": "0",
              "optimizer.type": "adamw8bit", "model.train_text_encoder_1": "false",
              "data.image_index_path": str(tmp / "image_index.json"), **extra}
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_sample_set(folder, count=8, width=160, height=128)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny SDXL saved as a Diffusers folder (what --save-tiny-model writes)."""
    from sdxl_ff.model.parts import build_tiny_sdxl, save_pipeline
    folder = tmp_path_factory.mktemp("tiny_sdxl") / "tiny"
    save_pipeline(build_tiny_sdxl(0), folder)
    return folder


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory):
    """The suite's trainer runs on two processes, all in one launch per session (tests/two_process_runs.py)."""
    from two_process_runs import launch_once
    return launch_once(tmp_path_factory)


def tiny_config(tmp: Path, image_dir: Path, steps: int = 10, base: Path | None = None, **extra: str):
    """The config of `tiny_overrides` over `base` (a config file, or the defaults), loaded in-process."""
    from sdxl_ff.config.load import load_config
    args = tiny_overrides(tmp, image_dir, steps, **extra)
    return load_config(base, [a for a in args if a != "--set"])


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet weights of a saved Diffusers folder."""
    from safetensors.torch import load_file
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
