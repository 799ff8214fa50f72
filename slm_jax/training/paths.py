"""Model directories and converted weights on local disks or in cloud buckets (``gs://...``).

Every file operation on a model directory (checkpoints, their metadata and integrity manifest,
config.gin, TensorBoard event files, the run lock) and on a converted checkpoint goes through
this module. A local path is handled exactly as by ``os``/``open`` (the same calls, the same
errors); a path with a bucket scheme (``gs://``, also ``s3://`` and ``az://`` where their fsspec
file systems are installed) goes through ``etils.epath``, which Orbax itself writes through,
while Orbax's arrays go through TensorStore. ``os.path.abspath`` of ``gs://bkt/run`` would be a
local folder ``./gs:/bkt/run``: bucket paths are never made absolute, only normalised.

``etils.epath`` reaches ``gs://`` through gcsfs (pinned in requirements.txt) unless
``EPATH_USE_TF`` is set: TensorFlow's GCS file system is epath's default when TensorFlow is
installed, but it costs a TensorFlow import at every start and cannot be pointed at a local
storage emulator, so the tested path is the gcsfs one. ``EPATH_USE_TF=1`` chooses TensorFlow's.

What a bucket lacks, and how the callers deal with it: there is no rename (a file is written in
place: an object upload is all or nothing), no file lock (``run_lock`` says so in the log) and
no free-space figure (the disk-space check is for local directories only).
"""

from __future__ import annotations

import builtins
import logging
import os
import posixpath
import re
import socket
import sys
import uuid
from typing import IO, Any
from urllib.parse import urlparse

from slm_jax.errors import UserError

# Set before epath picks a backend for a bucket path; a user's own setting wins. epath remembers
# whether TensorFlow is to be used from its first path of any kind: forgotten here if it ran first.
if "EPATH_USE_TF" not in os.environ:
    os.environ["EPATH_USE_TF"] = "false"
    _gpath = sys.modules.get("etils.epath.gpath")
    if _gpath is not None and hasattr(getattr(_gpath, "_is_tf_installed", None), "cache_clear"):
        _gpath._is_tf_installed.cache_clear()

_SCHEME = re.compile(r"^(gs|s3|az)://")


class BucketError(UserError):
    """A bucket path that cannot be used: the storage service is unreachable, or no such bucket."""


def is_remote(path: Any) -> bool:
    """True for a bucket path (``gs://bkt/dir``), False for a local one."""
    return bool(_SCHEME.match(os.fspath(path)))


def _split(path: str) -> tuple[str, str]:
    """'gs://bkt/a/b' -> ('gs://', 'bkt/a/b')."""
    scheme = _SCHEME.match(path).group(0)
    return scheme, path[len(scheme):]


def _normal(path: str) -> str:
    scheme, rest = _split(path)
    rest = posixpath.normpath(rest) if rest else rest
    return scheme + rest.strip("/")


def absolute(path: Any) -> str:
    """``os.path.abspath`` for a local path; a bucket path normalised (no trailing '/')."""
    path = os.fspath(path)
    return _normal(path) if is_remote(path) else os.path.abspath(path)


def join(path: Any, *parts: str) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return posixpath.join(path.rstrip("/") if not path.endswith("://") else path, *parts)
    return os.path.join(path, *parts)


def dirname(path: Any) -> str:
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = _split(_normal(path))
        return scheme + posixpath.dirname(rest)
    return os.path.dirname(path)


def basename(path: Any) -> str:
    path = os.fspath(path)
    return posixpath.basename(_normal(path)) if is_remote(path) else os.path.basename(path)


def relpath(path: Any, start: Any) -> str:
    path, start = os.fspath(path), os.fspath(start)
    if is_remote(path):
        return posixpath.relpath(_split(_normal(path))[1], _split(_normal(start))[1])
    return os.path.relpath(path, start)


def bucket(path: Any) -> str:
    """'gs://bkt/a/b' -> 'gs://bkt'."""
    scheme, rest = _split(_normal(os.fspath(path)))
    return scheme + rest.split("/", 1)[0]


# -- remote access ---------------------------------------------------------------------------
def _epath(path: str):
    """An ``epath.Path`` whose listings are read afresh: gcsfs keeps directory listings, and files
    written by another writer (TensorStore, another host, another run) must be seen."""
    from etils import epath

    # fsspec logs a line at INFO for every file it opens for reading.
    logging.getLogger("fsspec.caching").setLevel(logging.WARNING)
    if "gcsfs" in sys.modules or "s3fs" in sys.modules or "adlfs" in sys.modules:
        from etils.epath import backend as epath_backend

        try:
            epath_backend.fsspec_backend.fs(path).invalidate_cache()
        except (ImportError, ValueError, AttributeError):  # that scheme's file system is not installed
            pass
    return epath.Path(path)


def exists(path: Any) -> bool:
    path = os.fspath(path)
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: Any) -> bool:
    path = os.fspath(path)
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: Any) -> bool:
    path = os.fspath(path)
    return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def getsize(path: Any) -> int:
    path = os.fspath(path)
    return int(_epath(path).stat().length) if is_remote(path) else os.path.getsize(path)


def listdir(path: Any) -> list[str]:
    path = os.fspath(path)
    if is_remote(path):
        return [p.name for p in _epath(path).iterdir()]
    return os.listdir(path)


def makedirs(path: Any) -> None:
    """``os.makedirs(path, exist_ok=True)``; nothing to make in a bucket (folders are name prefixes)."""
    path = os.fspath(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def open(path: Any, mode: str = "r", **kwargs: Any) -> IO:  # noqa: A001 - the builtin, for buckets too
    path = os.fspath(path)
    if is_remote(path):
        return _epath(path).open(mode, **kwargs)
    return builtins.open(path, mode, **kwargs)


def remove(path: Any) -> None:
    path = os.fspath(path)
    if is_remote(path):
        _epath(path).unlink()
    else:
        os.remove(path)


def rmtree(path: Any) -> None:
    path = os.fspath(path)
    if is_remote(path):
        _epath(path).rmtree()
    else:
        import shutil

        shutil.rmtree(path)


def files_under(directory: Any) -> dict[str, str]:
    """Relative path -> full path of every file under ``directory``."""
    directory = os.fspath(directory)
    files = {}
    if not is_remote(directory):
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, directory)] = path
        return files
    scheme, top = _split(_normal(directory))
    for root, _, names in _epath(scheme + top).walk():
        root = os.fspath(root)
        root = _split(root)[1] if is_remote(root) else root.lstrip("/")  # fsspec leaves out the scheme
        for name in names:
            rel = posixpath.relpath(posixpath.join(root, name), top)
            files[rel] = scheme + posixpath.join(top, rel)
    return files


def write_file(path: Any, data: bytes | str, atomic: bool = True) -> None:
    """Writes ``data`` to ``path``: locally through a temporary file renamed over it (``atomic``),
    in a bucket in place (an object appears whole or not at all)."""
    path = os.fspath(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_remote(path) or not atomic:
        with open(path, mode) as f:
            f.write(data)
        return
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with builtins.open(tmp, mode) as f:
        f.write(data)
    os.replace(tmp, path)


def probe_write(directory: Any) -> None:
    """Writes and removes a small file in ``directory`` (a bucket: an object); raises OSError."""
    directory = os.fspath(directory)
    if not is_remote(directory):
        import tempfile

        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
        return
    path = join(directory, f".write_test_{uuid.uuid4().hex}")
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - the storage client's own errors (HTTP, credentials)
        raise OSError(f"{type(e).__name__}: {_first_line(e)}") from None
    try:
        remove(path)
    except Exception:  # noqa: BLE001 - a probe left behind is harmless
        pass


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


# -- a bucket that can be used ---------------------------------------------------------------
def _gcs_endpoint() -> tuple[str, int]:
    """Host and port of the Cloud Storage service (``STORAGE_EMULATOR_HOST``: an emulator)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        url = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80)
    return "storage.googleapis.com", 443


def check_bucket(path: Any, what: str = "model directory", timeout: float = 10.0) -> None:
    """For a ``gs://`` path: the storage service answers and the bucket exists, or BucketError
    (one line naming the bucket), in seconds rather than after the client's minute of retries.
    Nothing is written. Local paths and other schemes pass."""
    path = os.fspath(path)
    if not path.startswith("gs://"):
        return
    name = bucket(path)
    host, port = _gcs_endpoint()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise BucketError(f"{what} {path}: cannot reach the storage service of bucket {name} at {host}:{port} "
                          f"({e.strerror or e}); check the network, or STORAGE_EMULATOR_HOST") from None
    try:
        import gcsfs
    except ImportError:
        raise BucketError(f"{what} {path}: gs:// paths need gcsfs (pip install -r requirements.txt)") from None
    try:
        # One object of the bucket listed (what reading checkpoints needs anyway; reading the
        # bucket's own metadata needs a permission a training account may lack).
        # An emulator takes no credentials (and none are looked for: a warning at every start).
        token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None
        gcsfs.GCSFileSystem(token=token).call("GET", "b/{}/o", name[len("gs://"):], maxResults=1, json_out=True)
    except FileNotFoundError:
        raise BucketError(f"{what} {path}: bucket {name} does not exist (create it, or check the name)") from None
    except Exception as e:  # noqa: BLE001 - credentials, permissions, HTTP errors of the client
        raise BucketError(f"{what} {path}: cannot use bucket {name} ({type(e).__name__}: {_first_line(e)})") \
            from None
