"""Finding and downloading the ImageNet weights (fastvgg.download), against a local server.

An http.server on 127.0.0.1 stands in for Keras's storage; the tests swap the table of
file names and md5s (or write a real Keras-layout file and hash it), so nothing reaches the
network and no 500 MB file is needed. HOME, KERAS_HOME and FASTVGG_HOME point into tmp_path,
so the real caches are never touched.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import sys
import threading

import numpy as np
import pytest

import fastvgg
import keras_h5
import numpy_vgg as nv
from fastvgg import _progress, download
from fastvgg.download import WeightsDownloadError

ARCHITECTURE = "vgg16"
SMALL_FILENAME = "small_weights_notop.h5"
# Several read chunks, so a cut in the middle happens after data was written.
PAYLOAD = np.random.default_rng(0).bytes(2 * (1 << 20) + 12345)
# How long the stalling server waits at most before closing; the client's timeout is
# patched far below it, so the test sees the client give up, not the server.
STALL_SECONDS = 10.0


class WeightsServer:
    """Serves ``routes`` (URL path -> (behaviour, body)); every other path is a 404.

    Behaviours: "ok"; "cut" (announces the whole body, sends half, closes); "stall"
    (announces the body, sends half, then sends nothing more).
    """

    def __init__(self):
        self.routes = {}
        self.requests = []
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404, "Not Found")
                    return
                behaviour, body = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if behaviour == "ok":
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if behaviour == "stall":
                    server.release.wait(STALL_SECONDS)
                self.close_connection = True

            def log_message(self, format, *args):
                pass  # keeps the test output clean

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, architecture, filename, body, behaviour="ok"):
        self.routes[f"/{architecture}/{filename}"] = (behaviour, body)
        return f"{self.base_url}/{architecture}/{filename}"

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    weights_server = WeightsServer()
    yield weights_server
    weights_server.stop()


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Empty Keras and fastvgg caches inside tmp_path: (keras models dir, fastvgg dir)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("FASTVGG_HOME", str(tmp_path / "fastvgg_home"))
    monkeypatch.delenv(download.BASE_URL_ENV, raising=False)
    return tmp_path / "keras_home" / "models", tmp_path / "fastvgg_home"


@pytest.fixture
def small_table(monkeypatch):
    """IMAGENET_FILES with VGG16-notop pointing at the small PAYLOAD file."""
    table = dict(download.IMAGENET_FILES)
    table[(ARCHITECTURE, False)] = (SMALL_FILENAME, hashlib.md5(PAYLOAD).hexdigest())
    monkeypatch.setattr(download, "IMAGENET_FILES", table)


def fetch(base_url, **kwargs):
    kwargs.setdefault("progress", False)
    return download.imagenet_weights_path(ARCHITECTURE, False, base_url=base_url, **kwargs)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (just released by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_names_url_and_paths(error: WeightsDownloadError, url, homes):
    message = str(error)
    assert url in message
    for directory in homes:
        assert str(directory / SMALL_FILENAME) in message
    assert error.url == url
    assert error.paths == [str(directory / SMALL_FILENAME) for directory in homes]
    assert isinstance(error, OSError)


def assert_no_weights_left(homes):
    """Neither the final file nor a temporary one: a failed download leaves nothing."""
    for directory in homes:
        assert not directory.exists() or list(directory.iterdir()) == []


# Success and cache order -----------------------------------------------------------------
def test_download_lands_in_fastvgg_cache_and_is_reused(server, homes, small_table):
    url = server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD)
    keras_models, fastvgg_home = homes

    path = fetch(server.base_url)

    assert path == str(fastvgg_home / SMALL_FILENAME)
    assert hashlib.md5(read_bytes(path)).hexdigest() == hashlib.md5(PAYLOAD).hexdigest()
    assert sorted(os.listdir(fastvgg_home)) == [SMALL_FILENAME]  # no temporary file left
    assert not keras_models.exists()  # downloads go to fastvgg's cache, not Keras's
    assert server.requests == [f"/{ARCHITECTURE}/{SMALL_FILENAME}"]
    assert url.endswith(server.requests[0])

    assert fetch(server.base_url) == path
    assert len(server.requests) == 1  # the second call found the file


def test_keras_cache_is_preferred_and_nothing_is_downloaded(server, homes, small_table):
    server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD)
    keras_models, fastvgg_home = homes
    for directory in homes:
        directory.mkdir(parents=True)
        (directory / SMALL_FILENAME).write_bytes(b"a copy in " + str(directory).encode())

    assert fetch(server.base_url) == str(keras_models / SMALL_FILENAME)
    (keras_models / SMALL_FILENAME).unlink()
    assert fetch(server.base_url) == str(fastvgg_home / SMALL_FILENAME)
    assert server.requests == []


def test_default_homes_are_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.delenv("FASTVGG_HOME", raising=False)
    assert download.weights_cache_dirs() == [
        str(tmp_path / ".keras" / "models"),
        str(tmp_path / ".cache" / "fastvgg"),
    ]


def test_base_url_comes_from_environment_then_keras(monkeypatch):
    monkeypatch.delenv(download.BASE_URL_ENV, raising=False)
    filename = download.IMAGENET_FILES[("vgg19", True)][0]
    assert download.imagenet_weights_url("vgg19", True) == f"{download.IMAGENET_BASE_URL}/vgg19/{filename}"
    monkeypatch.setenv(download.BASE_URL_ENV, "http://127.0.0.1:9/mirror/")
    assert download.imagenet_weights_url("vgg19", True) == f"http://127.0.0.1:9/mirror/vgg19/{filename}"
    assert download.imagenet_weights_url("vgg19", True, "http://x") == f"http://x/vgg19/{filename}"


def test_keras_address_and_names_are_keras_own():
    # Keras's own table, imported from Keras, so a typo in ours cannot pass.
    pytest.importorskip("tensorflow", reason="TensorFlow cannot be imported here")
    from keras.src.applications import vgg16, vgg19

    assert download.IMAGENET_BASE_URL + "/vgg16/" + download.IMAGENET_FILES[("vgg16", True)][0] == vgg16.WEIGHTS_PATH
    assert download.IMAGENET_BASE_URL + "/vgg16/" + download.IMAGENET_FILES[("vgg16", False)][0] == (
        vgg16.WEIGHTS_PATH_NO_TOP
    )
    assert download.IMAGENET_BASE_URL + "/vgg19/" + download.IMAGENET_FILES[("vgg19", True)][0] == vgg19.WEIGHTS_PATH
    assert download.IMAGENET_BASE_URL + "/vgg19/" + download.IMAGENET_FILES[("vgg19", False)][0] == (
        vgg19.WEIGHTS_PATH_NO_TOP
    )


# Failures -----------------------------------------------------------------------------------
def test_http_404_names_url_and_paths(server, homes, small_table):
    url = f"{server.base_url}/{ARCHITECTURE}/{SMALL_FILENAME}"  # nothing served there
    with pytest.raises(WeightsDownloadError) as caught:
        fetch(server.base_url)
    assert "404" in str(caught.value)
    assert_names_url_and_paths(caught.value, url, homes)
    assert_no_weights_left(homes)


def test_cut_connection_leaves_nothing_and_next_call_succeeds(server, homes, small_table):
    url = server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD, behaviour="cut")
    with pytest.raises(WeightsDownloadError) as caught:
        fetch(server.base_url)
    assert f"of {len(PAYLOAD)} bytes" in str(caught.value)
    assert_names_url_and_paths(caught.value, url, homes)
    assert_no_weights_left(homes)

    server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD)
    path = fetch(server.base_url)
    assert read_bytes(path) == PAYLOAD
    assert len(server.requests) == 2


def test_wrong_bytes_fail_the_md5_check(server, homes, small_table):
    corrupted = bytearray(PAYLOAD)
    corrupted[len(corrupted) // 3] ^= 0xFF
    url = server.serve(ARCHITECTURE, SMALL_FILENAME, bytes(corrupted))
    with pytest.raises(WeightsDownloadError) as caught:
        fetch(server.base_url)
    assert "md5" in str(caught.value)
    assert hashlib.md5(bytes(corrupted)).hexdigest() in str(caught.value)
    assert_names_url_and_paths(caught.value, url, homes)
    assert_no_weights_left(homes)


def test_unreachable_server_names_url(homes, small_table):
    base_url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(WeightsDownloadError) as caught:
        fetch(base_url)
    assert "could not reach" in str(caught.value)
    assert_names_url_and_paths(caught.value, f"{base_url}/{ARCHITECTURE}/{SMALL_FILENAME}", homes)
    assert_no_weights_left(homes)


def test_stalled_server_times_out(server, homes, small_table, monkeypatch):
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT_SECONDS", 0.3)
    url = server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD, behaviour="stall")
    with pytest.raises(WeightsDownloadError) as caught:
        fetch(server.base_url)
    assert "sent nothing for 0.3 s" in str(caught.value)
    assert_names_url_and_paths(caught.value, url, homes)
    assert_no_weights_left(homes)


def test_unwritable_cache_is_a_clear_error(server, homes, small_table, monkeypatch, tmp_path):
    server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD)
    # A directory below a regular file cannot be made, even by root.
    blocker = tmp_path / "not_a_directory"
    blocker.write_bytes(b"")
    monkeypatch.setenv("FASTVGG_HOME", str(blocker / "cache"))
    with pytest.raises(WeightsDownloadError) as caught:
        fetch(server.base_url)
    assert "cannot write to the cache directory" in str(caught.value)
    assert "FASTVGG_HOME" in str(caught.value)
    assert server.requests == []


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(server, homes, small_table):
    server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD)
    _, fastvgg_home = homes
    fastvgg_home.mkdir(parents=True)
    prefix = download.TEMP_PREFIX + SMALL_FILENAME + "."
    stale = fastvgg_home / (prefix + "killed" + download.TEMP_SUFFIX)
    fresh = fastvgg_home / (prefix + "running" + download.TEMP_SUFFIX)
    for temp in (stale, fresh):
        temp.write_bytes(PAYLOAD[:100])
    old = stale.stat().st_mtime - 2 * download._STALE_TEMP_SECONDS
    os.utime(stale, (old, old))

    fetch(server.base_url)
    assert sorted(os.listdir(fastvgg_home)) == sorted([SMALL_FILENAME, fresh.name])


# Progress display -----------------------------------------------------------------------------
def test_progress_with_tqdm(server, homes, small_table, capsys):
    pytest.importorskip("tqdm")
    url = server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD)
    fetch(server.base_url, progress=True)
    err = capsys.readouterr().err
    assert url in err
    assert SMALL_FILENAME in err and "100%" in err


def test_progress_without_tqdm_is_a_plain_line(server, homes, small_table, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    url = server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD)
    fetch(server.base_url, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert url in lines[0]
    # pytest's capture is not a terminal: one line per 10%, from 0% to 100%.
    assert lines[1].startswith(f"{SMALL_FILENAME}:   0% 0 B/")
    assert lines[-1].startswith(f"{SMALL_FILENAME}: 100% 2.0 MB/2.0 MB")


def test_no_progress_prints_nothing(server, homes, small_table, capsys):
    server.serve(ARCHITECTURE, SMALL_FILENAME, PAYLOAD)
    fetch(server.base_url, progress=False)
    assert capsys.readouterr().err == ""


# End to end ----------------------------------------------------------------------------------
def test_vgg16_imagenet_downloads_a_keras_file_and_loads_it(server, homes, monkeypatch, tmp_path):
    weights = nv.random_weights(16, include_top=False, seed=7, bias_scale=0.05)
    source = tmp_path / "served_notop.h5"
    keras_h5.write_classic_h5(source, weights, nv.layer_names(16, include_top=False))
    body = source.read_bytes()
    filename = download.IMAGENET_FILES[("vgg16", False)][0]  # Keras's real name
    table = dict(download.IMAGENET_FILES)
    table[("vgg16", False)] = (filename, hashlib.md5(body).hexdigest())
    monkeypatch.setattr(download, "IMAGENET_FILES", table)
    server.serve("vgg16", filename, body)
    monkeypatch.setenv(download.BASE_URL_ENV, server.base_url)

    model = fastvgg.VGG16("imagenet", include_top=False, input_shape=(32, 32, 3))

    _, fastvgg_home = homes
    assert read_bytes(fastvgg_home / filename) == body
    for name, arrays in weights.items():
        loaded = model.get_layer(name).get_weights()
        assert len(loaded) == len(arrays)
        for got, expected in zip(loaded, arrays):
            np.testing.assert_array_equal(got, expected)

    fastvgg.VGG16("imagenet", include_top=False, input_shape=(32, 32, 3))
    assert len(server.requests) == 1


# The progress helper itself (also drawn by predict(verbose=1)) ------------------------------
class FakeStream:
    def __init__(self, tty):
        self.tty = tty
        self.text = ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_plain_progress_in_a_log_writes_one_line_per_ten_percent():
    stream = FakeStream(tty=False)
    with _progress.PlainProgressBar(20, unit="batch", desc="predict", stream=stream) as bar:
        for _ in range(20):
            bar.update(1)
    lines = stream.text.splitlines()
    assert lines == [f"predict: {p:3d}% {p // 5}/20 batch" for p in range(0, 101, 10)]


def test_plain_progress_on_a_terminal_redraws_one_line():
    stream = FakeStream(tty=True)
    with _progress.PlainProgressBar(3 << 20, unit="B", desc="w.h5", stream=stream) as bar:
        for _ in range(3):
            bar.update(1 << 20)
    assert stream.text.startswith("\rw.h5:   0% 0 B/3.0 MB")
    assert stream.text.endswith("\rw.h5: 100% 3.0 MB/3.0 MB\n")
    assert stream.text.count("\n") == 1


def test_plain_progress_without_total_counts_up():
    stream = FakeStream(tty=False)
    with _progress.PlainProgressBar(None, unit="B", desc="w.h5", stream=stream) as bar:
        bar.update(5 << 10)
    assert stream.text.splitlines() == ["w.h5: 0 B", "w.h5: 5.0 kB"]


def test_disabled_progress_bar_prints_nothing(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with _progress.progress_bar(10, unit="batch", enabled=False) as bar:
        bar.update(10)
    assert capsys.readouterr() == ("", "")
