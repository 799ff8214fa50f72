"""Checkpoint integrity: every committed step records its files' sizes and hashes, and a restore
refuses a damaged step (naming the file) before Orbax reads anything."""

import glob
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


def test_step_without_manifest_is_restored_unchecked(tmp_path):
    # Checkpoints written before the manifest existed (e.g. an older release) still restore.
    step_dir = _save(tmp_path)
    os.remove(os.path.join(step_dir, checkpointing.INTEGRITY_FILE))
    assert checkpointing.verify_integrity(step_dir) is False
    state, _ = _restore(tmp_path)
    np.testing.assert_array_equal(state["adapter"]["w"], _state()["adapter"]["w"])


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
