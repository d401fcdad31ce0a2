"""device= on the model constructors: the CPU by default, the GPU only where one is usable."""

import numpy as np
import pytest

import fastvgg
from fastvgg import _core


def small(device):
    return fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0, device=device)


def test_cpu_is_the_default_and_auto_falls_back_to_it_without_a_gpu():
    usable, reason = fastvgg.cuda_status()
    if usable:
        pytest.skip(f"a GPU is usable here ({reason}): 'auto' picks it")
    assert isinstance(small("cpu")._executor, _core.CpuExecutor)
    model = small("auto")
    assert isinstance(model._executor, _core.CpuExecutor)
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x), small("cpu").predict(x))


def test_cuda_without_a_usable_gpu_says_why():
    usable, reason = fastvgg.cuda_status()
    if usable:
        pytest.skip(f"a GPU is usable here ({reason})")
    with pytest.raises(RuntimeError, match="device='cuda' needs a usable NVIDIA GPU") as error:
        small("cuda")
    assert reason in str(error.value)


def test_unknown_devices_are_refused():
    with pytest.raises(ValueError, match="`device` must be one of"):
        small("gpu")


def test_load_model_takes_the_same_device_argument(tmp_path):
    missing = tmp_path / "never_read.keras"
    with pytest.raises(ValueError, match="`device` must be one of"):
        fastvgg.load_model(missing, device="gpu")
    usable, reason = fastvgg.cuda_status()
    if usable:
        pytest.skip(f"a GPU is usable here ({reason})")
    # The device is checked before the file is read: the GPU's absence is what the error says.
    with pytest.raises(RuntimeError, match="device='cuda' needs a usable NVIDIA GPU"):
        fastvgg.load_model(missing, device="cuda")
