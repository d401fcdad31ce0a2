"""ImageNet weights: Keras's official files, found in Keras's cache or fastvgg's, or downloaded.

The file names and md5 hashes are Keras's own (``keras.applications.vgg16``/``vgg19``), so a
file Keras downloaded once is used as it is, and a download comes from Keras's address.

A download streams into a temporary file beside the final one, checks the md5 as it goes,
and is renamed into place only when complete and correct, so an interrupted or corrupt
download never leaves a file that looks valid; the next call simply tries again. A file
already in a cache is not hashed again on load: hashing 528 MB takes about a second, longer
than loading the model, and fastvgg's cache only ever receives verified files. (Keras too
checks the hash only when it downloads.)
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from ._progress import progress_bar

IMAGENET_FILES = {
    ("vgg16", True): ("vgg16_weights_tf_dim_ordering_tf_kernels.h5", "64373286793e3c8b2b4e3219cbf3544b"),
    ("vgg16", False): ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
    ("vgg19", True): ("vgg19_weights_tf_dim_ordering_tf_kernels.h5", "cbe5617147190e668d6c5d5026f83318"),
    ("vgg19", False): ("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "253f8cb515780f3b799900260a226db6"),
}
IMAGENET_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications"
# Replaces IMAGENET_BASE_URL, for a mirror (or a test server); the file is fetched from
# "$FASTVGG_WEIGHTS_URL/vgg16/<filename>".
BASE_URL_ENV = "FASTVGG_WEIGHTS_URL"

# Per socket operation (connecting, each read): a dead server fails the call instead of
# hanging it, while a slow but live download is never cut short.
DOWNLOAD_TIMEOUT_SECONDS = 30.0
_CHUNK_BYTES = 1 << 20
# Temporary files start with a dot (hidden, and never the final name) and end in ".part".
TEMP_PREFIX = ".fastvgg-download-"
TEMP_SUFFIX = ".part"
# A temporary file untouched this long belongs to a download that was killed (a live one
# writes every few seconds); it is deleted so that dead 500 MB halves do not pile up.
_STALE_TEMP_SECONDS = 3600.0


class WeightsDownloadError(OSError):
    """The ImageNet weights were missing and could not be downloaded or stored.

    ``url`` is the file's address and ``paths`` the places where a copy put by hand would be
    found.
    """

    def __init__(self, message: str, url: str, paths: Sequence[str]):
        super().__init__(message)
        self.url = url
        self.paths = list(paths)

    def __str__(self) -> str:
        return str(self.args[0])


class _Failed(Exception):
    """Why one download attempt failed; turned into WeightsDownloadError by the caller."""


def weights_cache_dirs() -> List[str]:
    """Where ImageNet weights are looked for: Keras's cache first (a Keras user already has
    them there), then fastvgg's own, which is where downloads go."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    fastvgg_home = os.environ.get("FASTVGG_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "fastvgg")
    return [os.path.join(keras_home, "models"), fastvgg_home]


def imagenet_weights_url(architecture: str, include_top: bool, base_url: Optional[str] = None) -> str:
    filename, _ = IMAGENET_FILES[(architecture, include_top)]
    base = base_url or os.environ.get(BASE_URL_ENV) or IMAGENET_BASE_URL
    return f"{base.rstrip('/')}/{architecture}/{filename}"


def imagenet_weights_path(
    architecture: str,
    include_top: bool,
    *,
    base_url: Optional[str] = None,
    progress: bool = True,
) -> str:
    """The path of Keras's ImageNet weights file for ``architecture`` ("vgg16"/"vgg19"),
    downloading it into fastvgg's cache when no cache has it.

    Raises WeightsDownloadError (an OSError) naming the address and the places to put the
    file by hand when it cannot be downloaded.
    """
    filename, expected_md5 = IMAGENET_FILES[(architecture, include_top)]
    cache_dirs = weights_cache_dirs()
    candidates = [os.path.join(d, filename) for d in cache_dirs]
    for path in candidates:
        if os.path.isfile(path):
            return path

    url = imagenet_weights_url(architecture, include_top, base_url)
    destination = candidates[-1]
    try:
        _download(url, destination, expected_md5, progress)
    except _Failed as failure:
        raise WeightsDownloadError(
            f"Could not download the ImageNet weights for {architecture.upper()} from {url}: {failure}. "
            f"Download that file yourself and put it at one of: {', '.join(candidates)} "
            "(or pass its path as `weights`).",
            url,
            candidates,
        ) from failure.__cause__
    return destination


def _download(url: str, destination: str, expected_md5: str, progress: bool) -> None:
    directory = os.path.dirname(destination)
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_stale_temp_files(directory, os.path.basename(destination))
        fd, temp_path = tempfile.mkstemp(
            prefix=TEMP_PREFIX + os.path.basename(destination) + ".", suffix=TEMP_SUFFIX, dir=directory
        )
    except OSError as error:
        raise _Failed(
            f"cannot write to the cache directory {directory} ({error}); set FASTVGG_HOME to a writable directory"
        ) from error

    try:
        with os.fdopen(fd, "wb") as out:
            _stream_to(url, out, expected_md5, progress, destination)
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as error:
                raise _Failed(f"could not write {temp_path} ({error})") from error
        try:
            # mkstemp makes the file private (0600); the weights are public, like Keras's copy.
            os.chmod(temp_path, 0o644)
            os.replace(temp_path, destination)
        except OSError as error:
            raise _Failed(f"could not move the finished download to {destination} ({error})") from error
    except BaseException:
        # Also on KeyboardInterrupt: no half file stays behind.
        try:
            os.remove(temp_path)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _stream_to(url: str, out, expected_md5: str, progress: bool, destination: str) -> None:
    # Imported here: urllib.request brings ssl, ~5 MB of memory that only a download needs.
    import http.client
    import socket
    import urllib.error
    import urllib.request

    md5 = hashlib.md5()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            length_header = response.headers.get("Content-Length")
            expected_length = int(length_header) if length_header and length_header.isdigit() else None
            if progress:
                print(f"fastvgg: downloading {url} to {destination}", file=sys.stderr, flush=True)
            name = os.path.basename(destination)
            with progress_bar(expected_length, unit="B", desc=name, enabled=progress) as bar:
                while True:
                    chunk = response.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                    md5.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        error.close()  # it holds the connection open otherwise
        raise _Failed(f"the server answered HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise _Failed(f"could not reach the server ({error.reason})") from error
    except (socket.timeout, TimeoutError) as error:
        raise _Failed(f"the server sent nothing for {DOWNLOAD_TIMEOUT_SECONDS:g} s") from error
    except http.client.IncompleteRead as error:
        raise _Failed(f"the connection ended after {received + len(error.partial)} bytes") from error
    except (OSError, http.client.HTTPException) as error:
        raise _Failed(f"the download failed after {received} bytes ({error!r})") from error

    # http.client returns a short body without complaint when the connection drops, so
    # the length is checked here.
    if expected_length is not None and received != expected_length:
        raise _Failed(f"the connection ended after {received} of {expected_length} bytes")
    if md5.hexdigest() != expected_md5:
        raise _Failed(
            f"the downloaded file's md5 is {md5.hexdigest()}, not Keras's {expected_md5} "
            "(corrupted on the way, or a different file at that address)"
        )


def _remove_stale_temp_files(directory: str, filename: str) -> None:
    prefix = TEMP_PREFIX + filename + "."
    now = time.time()
    for entry in os.listdir(directory):
        if not (entry.startswith(prefix) and entry.endswith(TEMP_SUFFIX)):
            continue
        path = os.path.join(directory, entry)
        try:
            if now - os.path.getmtime(path) > _STALE_TEMP_SECONDS:
                os.remove(path)
        except OSError:
            pass  # another process removed or renamed it meanwhile


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; best effort, as not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
