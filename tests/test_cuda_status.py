"""fastvgg.cuda_status() and the device choice, wherever the tests run: with or without the
CUDA module, with or without a driver. Nothing here may raise except where CUDA is insisted on."""

import sys

import numpy as np
import pytest

import fastvgg
from fastvgg import cuda as fastvgg_cuda


@pytest.fixture
def fresh_cuda_state(monkeypatch):
    """Forget the cached import so each test chooses what `import fastvgg._cuda` does."""
    monkeypatch.setattr(fastvgg_cuda, "_loaded", False)
    monkeypatch.setattr(fastvgg_cuda, "_module", None)
    monkeypatch.setattr(fastvgg_cuda, "_import_problem", None)


def test_status_is_a_flag_and_a_reason():
    usable, reason = fastvgg.cuda_status()
    assert isinstance(usable, bool) and isinstance(reason, str) and reason
    assert fastvgg.cuda_status is fastvgg_cuda.cuda_status


def test_without_the_module_the_reason_says_how_to_build_it(fresh_cuda_state, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastvgg._cuda", None)  # makes the import fail
    usable, reason = fastvgg.cuda_status()
    assert usable is False
    assert "built without CUDA" in reason and "FASTVGG_CUDA=ON" in reason
    assert fastvgg_cuda.cuda_built() is False
    assert fastvgg_cuda.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="built without CUDA"):
        fastvgg_cuda.resolve_device("cuda")


class _FakeModule:
    """Stands in for fastvgg._cuda to steer status()."""

    def __init__(self, answer):
        self.answer = answer

    def status(self):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    "answer, usable, fragment",
    [
        ((False, "cudaErrorNoDevice (no CUDA-capable device is detected)"), False, "cudaErrorNoDevice"),
        ((True, "NVIDIA H200 (device 0 of 1, sm_90)"), True, "H200"),
        (RuntimeError("driver exploded"), False, "driver exploded"),
    ],
)
def test_status_passes_on_the_runtime_answer(fresh_cuda_state, monkeypatch, answer, usable, fragment):
    monkeypatch.setattr(fastvgg_cuda, "_loaded", True)
    monkeypatch.setattr(fastvgg_cuda, "_module", _FakeModule(answer))
    got_usable, reason = fastvgg.cuda_status()
    assert got_usable is usable and fragment in reason
    assert fastvgg_cuda.resolve_device("auto") == ("cuda" if usable else "cpu")
    if not usable:
        with pytest.raises(RuntimeError, match=f"device='cuda' needs a usable NVIDIA GPU, but .*{fragment}"):
            fastvgg_cuda.resolve_device("cuda")


@pytest.mark.parametrize("device", ["gpu", "CUDA", None, 0])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ValueError, match="`device` must be one of"):
        fastvgg_cuda.resolve_device(device)


def test_resolve_device_cpu_never_touches_cuda(fresh_cuda_state, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastvgg._cuda", None)
    assert fastvgg_cuda.resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("architecture, depth", [(fastvgg.VGG16, 13), (fastvgg.VGG19, 16)])
def test_describe_model_lists_the_layers_as_the_graph_does(architecture, depth):
    from cuda_builds import emulated_module

    model = architecture(None, input_shape=(32, 48, 3), classes=10, seed=0)
    ops, channels = fastvgg_cuda.describe_model(model)
    assert channels == 3
    assert [op["kind"] for op in ops].count("conv3x3") == depth
    assert [op["kind"] for op in ops][-4:] == ["flatten", "dense", "dense", "dense"]
    assert ops[-1]["activation"] == "softmax" and ops[-1]["out_channels"] == 10
    executor = emulated_module().CudaExecutor(ops, channels)
    shapes = executor.output_shapes(32, 48)
    assert [tuple(s) for s in shapes] == [tuple(layer.output_shape[1:]) for layer in model.layers[1:]]


def test_new_executor_refuses_without_a_gpu(fresh_cuda_state, monkeypatch):
    monkeypatch.setattr(fastvgg_cuda, "_loaded", True)
    monkeypatch.setattr(fastvgg_cuda, "_module", _FakeModule((False, "no GPU in this test")))
    model = fastvgg.VGG16(None, include_top=False, input_shape=(32, 32, 3), seed=0)
    with pytest.raises(RuntimeError, match="no GPU in this test"):
        fastvgg_cuda.executor_for_model(model)
    assert np.isfinite(model.predict(np.zeros((1, 32, 32, 3), np.float32))).all()  # the CPU still works
