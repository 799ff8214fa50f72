"""Checkpoint integrity: every committed step records its files' sizes and hashes, and a restore
refuses a damaged step (naming the file) before Orbax reads anything."""

import glob
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm_jax.training import checkpointing


def _state():
    return {"step": jnp.asarray(3, jnp.int32), "adapter": {"w": jnp.arange(256, dtype=jnp.float32).reshape(16, 16)}}


def _save(directory):
    ckpt = checkpointing.Checkpointer(str(directory))
    ckpt.save(3, _state(), {"batches": 3, "seed": 0}, {"adapter_shapes": {}, "frozen_sources": {}})
    ckpt.close()
    return os.path.join(str(directory), "3")


def _restore(directory):
    ckpt = checkpointing.Checkpointer(str(directory), read_only=True)
    try:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())
        return ckpt.restore(3, abstract)
    finally:
        ckpt.close()


def _data_files(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    assert files, "expected Orbax data files under state/ocdbt.process_0/d"
    return files


def test_manifest_lists_every_file_and_clean_restore_passes(tmp_path):
    step_dir = _save(tmp_path)
    table = json.load(open(os.path.join(step_dir, checkpointing.INTEGRITY_FILE)))["files"]
    on_disk = {os.path.relpath(p, step_dir) for p in glob.glob(os.path.join(step_dir, "**"), recursive=True)
               if os.path.isfile(p)} - {checkpointing.INTEGRITY_FILE}
    assert set(table) == on_disk
    assert checkpointing.verify_integrity(step_dir) is True
    state, position = _restore(tmp_path)
    np.testing.assert_array_equal(state["adapter"]["w"], _state()["adapter"]["w"])
    assert position == {"batches": 3, "seed": 0}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_step_is_refused_with_the_file_named(tmp_path, damage):
    step_dir = _save(tmp_path)
    victim = _data_files(step_dir)[0]
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
        expected = "bytes"
    elif damage == "flip":
        with open(victim, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        expected = "SHA-256 differs"
    else:
        os.remove(victim)
        expected = "is missing"
    with pytest.raises(checkpointing.CheckpointError) as err:
        _restore(tmp_path)
    message = str(err.value)
    assert "is damaged" in message and os.path.relpath(victim, step_dir) in message and expected in message


def _as_written_before_manifests(step_dir):
    """A step as the code before integrity manifests wrote it: no integrity.json, and no promise of
    one in its metadata."""
    os.remove(os.path.join(step_dir, checkpointing.INTEGRITY_FILE))
    meta_path = os.path.join(step_dir, "meta", "metadata")
    meta = json.load(open(meta_path))
    del meta[checkpointing.INTEGRITY_KEY]
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def test_step_written_before_manifests_is_restored_unchecked(tmp_path):
    # Checkpoints written before the manifest existed (e.g. an older release) still restore.
    step_dir = _save(tmp_path)
    _as_written_before_manifests(step_dir)
    assert checkpointing.verify_integrity(step_dir) is False
    state, _ = _restore(tmp_path)
    np.testing.assert_array_equal(state["adapter"]["w"], _state()["adapter"]["w"])


def _flip_three_bytes(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in (0, len(data) // 2, len(data) - 1):
            data[i] ^= 0x5A
        f.seek(0)
        f.write(data)


def test_step_missing_its_manifest_is_refused_not_loaded_silently(tmp_path):
    """Killed between Orbax's commit and the manifest (or the manifest deleted), then damaged: the
    step's metadata promises a manifest, so it cannot be verified and is refused in one line."""
    step_dir = _save(tmp_path)
    os.remove(os.path.join(step_dir, checkpointing.INTEGRITY_FILE))
    victim = max(_data_files(step_dir), key=os.path.getsize)
    before = hashlib.sha256(open(victim, "rb").read()).hexdigest()
    _flip_three_bytes(victim)
    assert hashlib.sha256(open(victim, "rb").read()).hexdigest() != before
    with pytest.raises(checkpointing.CheckpointError) as err:
        _restore(tmp_path)
    message = str(err.value)
    assert "cannot be verified" in message and "no integrity.json" in message and "\n" not in message
    # Undamaged, it is refused all the same: nothing proves it whole.
    _flip_three_bytes(victim)
    assert hashlib.sha256(open(victim, "rb").read()).hexdigest() == before
    with pytest.raises(checkpointing.CheckpointError, match="cannot be verified"):
        _restore(tmp_path)


class _Spec:
    def __init__(self, layers):
        from slm_jax.models.encoders.conformer import ConformerConfig
        from slm_jax.models.llms.t5 import T5Config

        self.speech_encoder = ConformerConfig(d_model=32, num_layers=1, ffn_dim=64, conv_kernel_size=5)
        self.llm = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers)


def test_frozen_models_of_another_shape_are_refused_by_name():
    """Two 'random:1' LLMs of 2 and 3 layers share a source string, not a model."""
    adapter = {"input_projection": {"kernel": np.zeros((32, 8))}}
    sources = {"speech_encoder": "random:0", "llm": "random:1"}
    two = checkpointing.describe_state(adapter, sources, frozen_configs=checkpointing.frozen_configs(_Spec(2)))
    three = checkpointing.describe_state(adapter, sources, frozen_configs=checkpointing.frozen_configs(_Spec(3)))
    checkpointing.check_compatible(two, json.loads(json.dumps(two)), "run")
    with pytest.raises(checkpointing.CheckpointError) as err:
        checkpointing.check_compatible(json.loads(json.dumps(two)), three, "run")
    assert "frozen llm T5Config.num_layers was 2, now 3" in str(err.value)
    with pytest.raises(checkpointing.CheckpointError, match="num_layers was 2, now 3"):
        checkpointing.check_frozen_configs(two, checkpointing.frozen_configs(_Spec(3)), "run")
    # Checkpoints from before the record (e.g. the releases) are still read.
    legacy = {k: v for k, v in two.items() if k != "frozen_configs"}
    checkpointing.check_compatible(legacy, three, "run")
    checkpointing.check_frozen_configs(legacy, checkpointing.frozen_configs(_Spec(3)), "run")


def test_the_releases_are_still_accepted():
    for release in glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "release", "*", "[0-9]*")):
        meta = checkpointing.read_metadata(os.path.dirname(release), int(os.path.basename(release)))
        assert "frozen_configs" not in meta
        checkpointing.check_frozen_configs(meta, checkpointing.frozen_configs(_Spec(3)), release)
        checkpointing.verify_integrity(release)  # with or without a manifest: readable, never refused


def test_a_changed_setting_on_resume_is_a_one_line_notice(caplog):
    adapter = {"w": np.zeros((2, 2))}
    old = checkpointing.describe_state(adapter, {}, settings={"learning_rate": 0.003, "batch_size": 8})
    new = checkpointing.describe_state(adapter, {}, settings={"learning_rate": 0.03, "batch_size": 8})
    with caplog.at_level("WARNING"):
        checkpointing.check_compatible(old, new, "runs/x")
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["resuming runs/x with a changed setting: learning_rate 0.003 -> 0.03"]


def test_unreadable_manifest_is_damage(tmp_path):
    step_dir = _save(tmp_path)
    with open(os.path.join(step_dir, checkpointing.INTEGRITY_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(checkpointing.CheckpointError, match="integrity.json is unreadable"):
        _restore(tmp_path)


def test_an_adapter_is_refused_for_a_front_end_it_did_not_read():
    """The encoder-only and the Whisper-transcriber front ends give the adapter inputs of the same
    shape but another meaning: shapes alone would let one's adapter load into the other."""
    adapter = {"input_projection": {"kernel": np.zeros((512, 8))}}
    sources = {"speech_encoder": "package:whisper-base", "llm": "package:smollm2-135m-instruct"}
    encoder_only = checkpointing.describe_state(adapter, sources)
    transcriber = checkpointing.describe_state(adapter, sources, "whisper_transcriber")
    checkpointing.check_compatible(transcriber, transcriber, "run")
    with pytest.raises(checkpointing.CheckpointError, match="'encoder' outputs.*'whisper_transcriber'"):
        checkpointing.check_compatible(encoder_only, transcriber, "run")
    # A checkpoint written before the field existed counts as encoder-only.
    legacy = {k: v for k, v in encoder_only.items() if k != "speech_front_end"}
    checkpointing.check_compatible(legacy, encoder_only, "run")
    with pytest.raises(checkpointing.CheckpointError, match="whisper_transcriber"):
        checkpointing.check_compatible(legacy, transcriber, "run")
