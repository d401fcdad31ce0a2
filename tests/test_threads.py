"""One model used from several Python threads at once.

predict releases the GIL for the whole forward pass, and the C++ core keeps its scratch per
calling thread, so concurrent calls must neither block each other nor share scratch: every
result must be bit-identical to the same call made alone. (tests/test_models.py runs three
threads on one image size; these mix sizes, precisions and the thread setting.)
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import fastvgg
from helpers import noise_images

# Different sizes per thread: a thread whose scratch was sized for a smaller image by a call
# on another thread would read or write out of bounds, or mix images.
SHAPES = [(2, 40, 40), (1, 64, 48), (3, 32, 32), (2, 56, 72)]


@pytest.fixture(scope="module", params=["fast", "highest"])
def model(request):
    return fastvgg.VGG16(None, include_top=False, seed=0, precision=request.param)


@pytest.fixture(scope="module")
def inputs():
    return [noise_images(n, (h, w), seed) for seed, (n, h, w) in enumerate(SHAPES)]


def run_threads(count, target):
    """Starts `count` threads on target(worker) together and re-raises the first exception."""
    barrier = threading.Barrier(count)
    errors = []

    def body(worker):
        try:
            barrier.wait()
            target(worker)
        except BaseException as error:  # noqa: BLE001 - reported to the test below
            errors.append(error)

    threads = [threading.Thread(target=body, args=(worker,)) for worker in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_four_threads_give_the_serial_results_bit_for_bit(model, inputs):
    expected = [model.predict(x) for x in inputs]
    mismatches = []

    def work(worker):
        for repeat in range(3):
            # Each thread walks the inputs in its own order, so sizes overlap differently.
            for k in range(len(inputs)):
                i = (k + worker + repeat) % len(inputs)
                if not np.array_equal(model.predict(inputs[i]), expected[i]):
                    mismatches.append((worker, repeat, i))

    run_threads(4, work)
    assert mismatches == []


def test_threads_on_a_model_with_the_top():
    # The dense layers keep per-thread rows too, sized by the batch.
    model = fastvgg.VGG16(None, input_shape=(32, 32, 3), classes=7, seed=1)
    batches = [noise_images(n, (32, 32), seed) for seed, n in enumerate((1, 5, 2, 9))]
    expected = [model.predict(x) for x in batches]
    results = {}

    def work(worker):
        results[worker] = [model.predict(batches[(worker + k) % 4]) for k in range(4)]

    run_threads(4, work)
    for worker, outputs in results.items():
        for k, output in enumerate(outputs):
            assert np.array_equal(output, expected[(worker + k) % 4]), (worker, k)


def test_other_python_threads_run_while_predict_computes():
    """A ticker thread that needs the GIL every millisecond keeps ticking during predict.

    If predict held the GIL while computing, the ticker could only run in the Python parts
    of predict, which take well under one 5 ms switch interval: at most one tick. The
    computation here is over a hundred times longer than one tick on any machine we know of.
    """
    model = fastvgg.VGG16(None, include_top=False, seed=0, precision="highest")
    x = noise_images(2, (224, 224), seed=9)
    model.predict(x[:1, :32, :32])  # warm-up: nothing lazily initialised during the timed call
    ticks = 0
    stop = threading.Event()

    def ticker():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        time.sleep(0.01)
        before = ticks
        result = model.predict(x, batch_size=2)
        during = ticks - before
    finally:
        stop.set()
        thread.join()
    assert result.shape == (2, 7, 7, 512)
    assert during >= 5, f"the other thread ticked {during} times while predict ran: the GIL was not released"


def test_set_num_threads_while_predicting(model, inputs):
    expected = [model.predict(x) for x in inputs]
    original = fastvgg.get_num_threads()
    done = threading.Event()
    lock = threading.Lock()
    finished = []
    mismatches = []

    def predictor(worker):
        for repeat in range(3):
            for k in range(len(inputs)):
                i = (k + worker) % len(inputs)
                if not np.array_equal(model.predict(inputs[i]), expected[i]):
                    mismatches.append((worker, repeat, i))

    def work(worker):
        if worker == 0:  # the thread count never changes a bit of the results, so keep changing it
            n = 0
            while not done.is_set():
                fastvgg.set_num_threads(1 + n % 3)
                n += 1
                time.sleep(0.0005)
        else:
            try:
                predictor(worker)
            finally:
                with lock:
                    finished.append(worker)
                    if len(finished) == 3:
                        done.set()

    try:
        run_threads(4, work)
    finally:
        fastvgg.set_num_threads(original)
    assert mismatches == []
    assert fastvgg.get_num_threads() == original


@pytest.mark.parametrize("preset, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "active"}, "ACTIVE")])
def test_waiting_threads_sleep_unless_the_user_says_otherwise(preset, expected):
    # fastvgg asks libgomp for sleeping (not spinning) waits when nobody chose a policy: spinning
    # threads starve other busy processes on the machine (see fastvgg/__init__.py). What counts
    # is the policy libgomp took (omp_display_env prints it), and that the environment other
    # libraries and child processes see is left as the user had it.
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libgomp.so.1")
    except OSError:
        pytest.skip("this build's OpenMP is not libgomp (the policy is libgomp's)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_DISPLAY_ENV")}
    env.update(preset)
    code = ("import ctypes, os, sys, fastvgg; print(os.environ.get('OMP_WAIT_POLICY')); sys.stdout.flush(); "
            "ctypes.CDLL('libgomp.so.1').omp_display_env(0)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines() + out.stderr.splitlines()
    assert lines[0] == str(preset.get("OMP_WAIT_POLICY"))
    policy = [line for line in lines if "OMP_WAIT_POLICY" in line and "=" in line]
    assert policy and f"'{expected}'" in policy[0], lines
