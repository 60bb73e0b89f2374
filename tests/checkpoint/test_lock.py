"""One run per output folder (two real processes), stale locks of killed runs, leftovers of killed saves,
and caches built by two processes at once."""

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, pause_env, read_until_held, release, run_in_process, tiny_overrides
from safetensors.torch import load_file

from sdxl_ff.checkpoint.lock import OutputInUse, lock_path, output_lock
from sdxl_ff.data.latent_cache import valid_entry
from sdxl_ff.data.synthetic import write_sample_set


def _popen(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train_sdxl_ff.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_second_run_into_the_same_folder_stops_at_once_naming_the_first(tmp_path):
    args = tiny_overrides(tmp_path, ROOT / "data" / "images", steps=2, **{"training.batch_size": "1"})
    pause = tmp_path / "pause"
    first = _popen(args, env=pause_env(pause, "step-1"))  # held after its first step, the lock taken
    read_until_held(first.stderr, "step-1")
    lock = tmp_path / "out" / ".test.lock"
    assert json.loads(lock.read_text())["pid"] == first.pid
    second = run_in_process(*args)  # this test's own process: the second of two real processes
    release(pause, "step-1")
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"error: training.output_dir: {tmp_path / 'out' / 'test'} is in use by another run (pid {first.pid} " \
           f"on host " in second.stderr
    assert "INFO device:" not in second.stderr  # refused before any model loaded
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert not lock.exists()  # released on exit
    # the first run's own outputs are complete: one run wrote them all
    assert (tmp_path / "out" / "test" / "model_index.json").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_runs_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    output_dir = tmp_path / "out" / "run"
    lock = lock_path(output_dir)
    lock.parent.mkdir(parents=True)
    dead = _dead_pid()
    lock.write_text(json.dumps({"pid": dead, "host": "somewhere", "started": 0}))  # what kill -9 leaves
    with caplog.at_level(logging.WARNING, logger="sdxl_ff"), output_lock(output_dir):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {dead} on host somewhere" in caplog.text
    assert not lock.exists()


def test_a_live_lock_held_by_another_process_is_refused(tmp_path):
    output_dir = tmp_path / "out" / "run"
    holder = subprocess.Popen([sys.executable, "-c", (  # holds the lock until killed (stdin stays open)
        "import sys; sys.path.insert(0, sys.argv[2]); from sdxl_ff.checkpoint.lock import output_lock\n"
        "with output_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()"), str(output_dir), str(ROOT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUse, match=rf"in use by another run \(pid {holder.pid} on host "):
            with output_lock(output_dir):
                pass
        assert json.loads(lock_path(output_dir).read_text())["pid"] == holder.pid  # the refusal left it alone
    finally:
        holder.kill()
        holder.wait()
    with output_lock(output_dir):  # the kernel released the killed holder's lock
        pass


def test_leftovers_of_a_save_killed_with_sigkill_are_removed_by_the_next_run(tmp_path, caplog):
    output_dir = tmp_path / "out" / "run"
    saver = subprocess.Popen([sys.executable, "-c", (  # held inside the save until killed (stdin stays open)
        "import sys; sys.path.insert(0, sys.argv[2]); from sdxl_ff.runtime.files import replace_dir_atomic\n"
        "with replace_dir_atomic(sys.argv[1]) as tmp:\n"
        "    (tmp / 'unet.safetensors').write_bytes(bytes(1 << 20)); print('saving', flush=True); sys.stdin.read()"),
        str(output_dir), str(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() == "saving"
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    leftovers = list(output_dir.parent.glob(".run.*.tmp"))
    assert len(leftovers) == 1 and (leftovers[0] / "unet.safetensors").is_file()
    other = output_dir.parent / ".run.b.abcd1234.tmp"  # a save of the run named "run.b": not this run's
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="sdxl_ff"), output_lock(output_dir):
        assert not leftovers[0].exists()
    assert f"removed {leftovers[0]}, left by an interrupted save" in caplog.text
    assert other.is_dir()


def test_two_processes_building_one_cache_at_once(tmp_path):
    images = tmp_path / "images"
    write_sample_set(images, count=12, width=64, height=64)
    cache = tmp_path / "cache"
    pauses = [tmp_path / f"pause{i}" for i in range(2)]
    runs = [_popen(["--cache-only", *tiny_overrides(tmp_path, images, **{
        "run.name": f"r{i}", "data.size": "64", "data.latent_cache.enabled": "true",
        "data.latent_cache.cache_dir": str(cache / "latents"), "data.text_embedding_cache.enabled": "true",
        "data.text_embedding_cache.cache_dir": str(cache / "text")})], env=pause_env(pauses[i], "caches"))
            for i in range(2)]
    for proc in runs:  # both hold where they are about to build: they build at once, whichever started faster
        read_until_held(proc.stderr, "caches")
    for pause in pauses:
        release(pause, "caches")
    for proc in runs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    assert not [p for p in entries if p.name.endswith(".tmp")]  # every write was atomic and completed
    latents = [p for p in entries if "latents" in p.parts]
    assert len(latents) == 12 and len(entries) == 12 + 12  # one entry per image and per distinct caption
    for path in latents:
        assert valid_entry(path, path.stem, {"mean": (4, 8, 8), "std": (4, 8, 8)}, load_file(str(path))["mean"].dtype)
    for path in entries:  # every entry is whole: its checksum matches its tensors
        assert valid_entry(path, path.stem, {n: tuple(t.shape) for n, t in load_file(str(path)).items()},
                           next(iter(load_file(str(path)).values())).dtype)
