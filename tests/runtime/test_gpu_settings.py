"""model.allow_tf32, model.channels_last and model.cudnn_benchmark reach torch, and change results only within
float tolerance."""

import pytest
import torch
from conftest import ROOT, tiny_config

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.runtime.gpu_settings import (
    CUDNN_BENCHMARK_MAX_SHAPES,
    apply_speed_settings,
    cudnn_benchmark_wanted,
    set_tf32,
)
from train_sdxl_ff import train


@pytest.fixture
def restore_torch_flags():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def test_tf32_switch_reaches_both_matmuls_and_convolutions(restore_torch_flags):
    set_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the new API reads the same setting
    set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


def test_cudnn_benchmark_auto_turns_on_for_few_shapes_only():
    assert cudnn_benchmark_wanted("auto", 1) and cudnn_benchmark_wanted("auto", CUDNN_BENCHMARK_MAX_SHAPES)
    assert not cudnn_benchmark_wanted("auto", CUDNN_BENCHMARK_MAX_SHAPES + 1)
    assert cudnn_benchmark_wanted(True, 100) and not cudnn_benchmark_wanted(False, 1)


def test_settings_reach_torch_for_a_cuda_run(restore_torch_flags):
    unet = build_tiny_sdxl(0).unet
    line = apply_speed_settings(unet, torch.device("cuda"), allow_tf32=False, channels_last=True,
                                cudnn_benchmark="auto", distinct_shapes=3)
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "channels_last" in line and "TF32 for fp32 matmuls/convolutions: off" in line
    assert "cudnn.benchmark: on (3 batch shape(s), auto: on up to 8)" in line
    apply_speed_settings(unet, torch.device("cuda"), allow_tf32=True, channels_last=False, cudnn_benchmark="auto",
                         distinct_shapes=CUDNN_BENCHMARK_MAX_SHAPES + 1)
    assert torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark


def test_cpu_run_leaves_tf32_and_cudnn_alone(restore_torch_flags):
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    line = apply_speed_settings(build_tiny_sdxl(0).unet, torch.device("cpu"), allow_tf32=True, channels_last=False,
                                cudnn_benchmark=True, distinct_shapes=1)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
    assert line == "UNet memory format: contiguous (NCHW); TF32 and cudnn.benchmark apply to CUDA only"


def test_bad_values_name_the_key():
    expected = 'model.cudnn_benchmark: expected true or false or one of "auto", got "sometimes"'
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ['model.cudnn_benchmark="sometimes"'])
    with pytest.raises(ConfigError, match="model.allow_tf32"):
        load_config(None, ["model.allow_tf32=1"])


def test_channels_last_trains_within_tolerance_of_the_default(tmp_path, caplog):
    losses = {}
    for name, extra in (("default", {}), ("channels_last", {"model.channels_last": "true"})):
        with caplog.at_level("INFO", logger="sdxl_ff"):
            result = train(tiny_config(tmp_path, ROOT / "data" / "images", steps=4, **{"run.name": name, **extra}))
        losses[name] = result["losses"]
    assert "UNet memory format: channels_last" in caplog.text
    assert losses["channels_last"] == pytest.approx(losses["default"], rel=1e-3)
