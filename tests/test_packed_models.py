"""VGG16/VGG19 loaded through the packed-weights cache: the first load builds the file, the
next ones map it; predictions and get_weights are bit for bit those of a model loaded
without the cache; a damaged or stale file is rebuilt; two processes share its pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastvgg
import keras_h5
import numpy_vgg as nv
from fastvgg import packed_cache as pc

SIZE = (32, 32)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """VGG16 with a 10-class top for 32x32 inputs: every kind of packed section (direct and
    Winograd convolutions with their correction bytes, dense panels) in a few tens of MB."""
    path = tmp_path_factory.mktemp("weights") / "vgg16_small_top.h5"
    keras_h5.write_classic_h5(path, nv.random_weights(16, include_top=True, input_hw=SIZE, classes=10, seed=8,
                                                      bias_scale=0.05), nv.layer_names(16, include_top=True))
    return str(path)


def build(path, cache, precision="fast", depth=16):
    model = (fastvgg.VGG16 if depth == 16 else fastvgg.VGG19)(
        path, include_top=True, classes=10, input_shape=SIZE + (3,), precision=precision, packed_cache=cache)
    return model


def images():
    return np.random.default_rng(2).uniform(-120, 150, (3,) + SIZE + (3,)).astype(np.float32)


def layers_out(model):
    return model.extract(images(), ["block2_conv2:preact", "block5_pool", "fc1", "predictions"])


from bf16_checks import AMX_UNAVAILABLE, BF16_UNAVAILABLE  # noqa: E402

BF16_SETS = [] if BF16_UNAVAILABLE else fastvgg._core.testing.bf16_kernel_sets()
# Each bf16 set packs its own layout: a precision of "bf16 <set>" runs that set.
PRECISIONS = ["fast", "highest"] + [f"bf16 {name}" for name in BF16_SETS] + ([] if AMX_UNAVAILABLE else ["bf16x3"])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_cached_model_predicts_and_returns_weights_bit_for_bit(weights_file, tmp_path, precision, monkeypatch):
    if precision.startswith("bf16 "):
        monkeypatch.setenv("FASTVGG_BF16_KERNELS", precision.split()[1])
        precision = "bf16"
    plain = build(weights_file, False, precision)
    assert plain._packed_cache_status == "off"
    first = build(weights_file, tmp_path, precision)
    again = build(weights_file, tmp_path, precision)
    assert (first._packed_cache_status, again._packed_cache_status) == ("built", "hit")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(pc.SUFFIX)]) == 1
    expected = layers_out(plain)
    for model in (first, again):
        for name, value in layers_out(model).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
        for a, b in zip(model.get_weights(), plain.get_weights()):
            np.testing.assert_array_equal(a, b)
    # Weights set after a mapped load replace the mapped ones (never written through): they read
    # back as from a model that never saw the cache (exactly kernel * 2 where the layout keeps
    # it; the int14 Winograd layout keeps a quantised transform, not the kernel).
    kernel, bias = again.get_layer("block3_conv1").get_weights()
    again.get_layer("block3_conv1").set_weights([kernel * 2, bias])
    plain.get_layer("block3_conv1").set_weights([kernel * 2, bias])
    np.testing.assert_array_equal(again.get_layer("block3_conv1").get_weights()[0],
                                  plain.get_layer("block3_conv1").get_weights()[0])
    if plain._executor.kernel_set != "avx512_bf16":  # its block3_conv1 is an int14 Winograd layer
        np.testing.assert_array_equal(again.get_layer("block3_conv1").get_weights()[0], kernel * 2)
    assert build(weights_file, tmp_path, precision)._packed_cache_status == "hit"


@pytest.mark.skipif(len(BF16_SETS) < 2, reason="one bf16 kernel set or none here: nothing to tell apart")
def test_each_bf16_kernel_set_gets_its_own_cache_file(weights_file, tmp_path, monkeypatch):
    statuses = []
    for name in BF16_SETS + BF16_SETS:
        monkeypatch.setenv("FASTVGG_BF16_KERNELS", name)
        statuses.append(build(weights_file, tmp_path, "bf16")._packed_cache_status)
    assert statuses == ["built"] * len(BF16_SETS) + ["hit"] * len(BF16_SETS)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(pc.SUFFIX)]) == len(BF16_SETS)


def test_damaged_cache_file_is_rebuilt_and_other_content_gets_its_own(weights_file, tmp_path):
    build(weights_file, tmp_path)
    (cache_file,) = [tmp_path / n for n in os.listdir(tmp_path) if n.endswith(pc.SUFFIX)]
    data = bytearray(cache_file.read_bytes())
    header_length = int.from_bytes(data[12:16], "little")
    sections = json.loads(bytes(data[24 : 24 + header_length]))["sections"]
    fc2 = next(s for s in sections if s["nbytes"] > (4 << 20))
    data[fc2["offset"] + 100] ^= 0x10
    cache_file.write_bytes(data)
    rebuilt = build(weights_file, tmp_path)
    assert rebuilt._packed_cache_status == "built"
    np.testing.assert_array_equal(rebuilt.predict(images()), build(weights_file, False).predict(images()))

    # The same name and size with other bytes (a retrained file copied over the old one).
    other = tmp_path / "other" / os.path.basename(weights_file)
    other.parent.mkdir()
    keras_h5.write_classic_h5(other, nv.random_weights(16, include_top=True, input_hw=SIZE, classes=10, seed=9),
                              nv.layer_names(16, include_top=True))
    assert build(str(other), tmp_path)._packed_cache_status == "built"
    assert len([n for n in os.listdir(tmp_path) if n.endswith(pc.SUFFIX)]) == 2
    np.testing.assert_array_equal(build(str(other), tmp_path).predict(images()),
                                  build(str(other), False).predict(images()))


def test_the_environment_variable_redirects_and_turns_off(weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv(pc.ENV, str(tmp_path / "redirected"))
    assert build(weights_file, None)._packed_cache_status == "built"
    assert any(n.endswith(pc.SUFFIX) for n in os.listdir(tmp_path / "redirected"))
    monkeypatch.setenv(pc.ENV, "off")
    assert build(weights_file, None)._packed_cache_status == "off"


SHARER = textwrap.dedent("""
    import sys, numpy as np, fastvgg
    fastvgg.set_num_threads(1)
    model = fastvgg.VGG16(sys.argv[1], include_top=True, classes=10, input_shape=(32, 32, 3), packed_cache=sys.argv[2])
    model.predict(np.zeros((1, 32, 32, 3), np.float32))   # touches every packed page
    print(model._packed_cache_status, flush=True)
    sys.stdin.readline()
""")


def mapped_file_memory(pid, suffix):
    """(Rss, Pss) in kB of the process's mappings of files ending in ``suffix``."""
    rss = pss = 0
    current = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
                current = len(fields) >= 6 and fields[-1].endswith(suffix)
            elif current and fields[0] == "Rss:":
                rss += int(fields[1])
            elif current and fields[0] == "Pss:":
                pss += int(fields[1])
    return rss, pss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/smaps")
def test_two_processes_share_the_mapped_pages(weights_file, tmp_path):
    build(weights_file, tmp_path)
    processes = [subprocess.Popen([sys.executable, "-c", SHARER, weights_file, str(tmp_path)], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in processes] == ["hit", "hit"]
        memory = [mapped_file_memory(p.pid, pc.SUFFIX) for p in processes]
    finally:
        for p in processes:
            p.communicate("\n", timeout=60)
    packed_kb = sum(s["nbytes"] for s in json.loads(_header_bytes(tmp_path))["sections"]) / 1024
    for rss, pss in memory:
        assert rss > 0.5 * packed_kb  # the weights really are the mapped file's pages
        assert pss < 0.6 * rss  # each page counted half: the two processes share them


def _header_bytes(directory):
    (name,) = [n for n in os.listdir(directory) if n.endswith(pc.SUFFIX)]
    with open(os.path.join(directory, name), "rb") as f:
        prefix = f.read(24)
        return f.read(int.from_bytes(prefix[12:16], "little"))
