"""Every benchmark's `--device` goes through `training.devices.parse_device_argument`: a device this machine cannot
run is a usage error (exit status 2, the reason named) before any model is built, as for the training commands."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgmllm.training.devices import parse_device_argument


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ("bench_generation.py", "bench_denoise_compile.py", "bench_train_memory.py", "check_flash_attention.py",
           "bench_training_step.py", "bench_vae_decode.py", "ablate_tiny_world.py")


def test_parse_device_argument_is_a_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="bench")
    assert parse_device_argument(parser, "cpu") == torch.device("cpu")
    with pytest.raises(SystemExit) as exit_info:
        parse_device_argument(parser, "gpu0")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: bench") and "--device 'gpu0' is not a device torch knows" in error


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_refuses_a_missing_gpu_before_any_work(script, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    extra = ["--work", str(tmp_path / "work")] if script == "ablate_tiny_world.py" else []
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--device", "cuda", *extra],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--device cuda: no CUDA device is available here" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "work").exists()
