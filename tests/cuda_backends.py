"""The backends the CUDA tests run on: the CPU grid emulator always, a GPU where one is usable.

Test modules use ``backend`` (defined here, imported by them) as a fixture; its "gpu"
parameter carries the ``gpu`` marker, so ``pytest -m gpu`` runs exactly the GPU cases, and
they are skipped with cuda_status()'s reason where no GPU can be used.
"""

import pytest

import fastvgg
from cuda_builds import emulated_module


def gpu_module():
    usable, reason = fastvgg.cuda_status()
    if not usable:
        pytest.skip(f"no usable GPU: {reason}")
    from fastvgg import _cuda

    return _cuda


@pytest.fixture(scope="module", params=["emulator", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request):
    return emulated_module() if request.param == "emulator" else gpu_module()
