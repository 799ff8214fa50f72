"""Orbax checkpoints of the trainable state only.

A checkpoint holds: the train state (step, adapter parameters, optimizer state, guard counters),
the data position (batches consumed + seed), and metadata that identifies the frozen models by
their *source* (e.g. 'random:seed=0', 'gguf:smollm2-135m-instruct@sha256:...') plus the adapter
shapes. Frozen weights are never copied into a checkpoint.

Orbax writes each step into a temporary directory and renames it when complete, so a
checkpoint cut off by SIGKILL is never picked up by ``latest_step``. After the rename, a small
``integrity.json`` records the size and SHA-256 of every file of the step; a restore checks them
first, so a damaged step is refused with the name of the damaged file before Orbax reads it (a
restore that fails inside TensorStore leaves background work behind that outlives the error).

The model directory may be a bucket (``gs://...``): every path goes through
``slm_jax.training.paths``, and Orbax marks a step committed there with a ``commit_success.txt``
instead of a rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from slm_jax.training import paths

log = logging.getLogger("slm_jax.training.checkpointing")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another configuration."""


def _shape_table(tree: Any) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


# Fields of the frozen models' configs that change how they are computed, not what they are:
# dtypes, rematerialisation, the attention kernel, and a transcriber front end's decoding choices.
RUNTIME_CONFIG_FIELDS = frozenset({
    "dtype", "param_dtype", "remat_policy", "attention_implementation", "causal_query_block", "mask_padding",
    "max_new_tokens", "stop_on_repeated_ngram", "speeds", "trailing_silence_frames", "whisper_tokenizer",
})


def _config_fields(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass's architectural fields as JSON values, nested configs as 'outer.inner'."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        if field.name in RUNTIME_CONFIG_FIELDS:
            continue
        value = getattr(cfg, field.name)
        name = prefix + field.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_config_fields(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, (tuple, list)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
            out[name] = list(value)
        else:
            out[name] = repr(value)
    return out


def frozen_configs(model: Any) -> dict[str, Any]:
    """What the frozen models are beyond their source string: each config's type and architectural
    fields (two 'random:1' LLMs of 2 and 3 layers share a source, not a model). ``model`` is a
    ModelSpec (its ``speech_encoder`` and ``llm`` configs)."""
    out = {}
    for name in ("speech_encoder", "llm"):
        cfg = getattr(model, name, None)
        if cfg is not None and dataclasses.is_dataclass(cfg):
            out[name] = {"type": type(cfg).__name__, "fields": _config_fields(cfg)}
    return out


def describe_state(adapter_params: Any, frozen_sources: Mapping[str, str], front_end: str = "encoder",
                   frozen_configs: Mapping[str, Any] | None = None,
                   settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: adapter shapes, frozen sources, the frozen
    models' configs (``frozen_configs(model)``) and what the adapter reads
    (``ModelSpec.speech_front_end``). ``settings`` (learning rate, batch size...) are recorded to
    name what a resumed run changed; they never refuse a checkpoint."""
    described = {"adapter_shapes": _shape_table(adapter_params), "frozen_sources": dict(frozen_sources),
                 "speech_front_end": front_end}
    if frozen_configs is not None:
        described["frozen_configs"] = json.loads(json.dumps(dict(frozen_configs)))
    if settings is not None:
        described["settings"] = json.loads(json.dumps(dict(settings), default=repr))
    return described


def frozen_config_problems(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Differences between two ``frozen_configs`` records, one phrase each (none where either
    side has no record: checkpoints written before it existed)."""
    problems = []
    old_all, new_all = saved.get("frozen_configs"), current.get("frozen_configs")
    if not isinstance(old_all, Mapping) or not isinstance(new_all, Mapping):
        return problems
    for name in sorted(set(old_all) & set(new_all)):
        old, new = old_all[name], new_all[name]
        if old.get("type") != new.get("type"):
            problems.append(f"frozen {name} was a {old.get('type')}, now a {new.get('type')}")
            continue
        old_fields, new_fields = old.get("fields", {}), new.get("fields", {})
        for key in sorted(set(old_fields) | set(new_fields)):
            if key in old_fields and key in new_fields and old_fields[key] != new_fields[key]:
                problems.append(f"frozen {name} {new.get('type')}.{key} was {old_fields[key]!r}, "
                                f"now {new_fields[key]!r}")
    return problems


def check_frozen_configs(saved: Mapping[str, Any], current_configs: Mapping[str, Any], where: str) -> None:
    """Refuses a checkpoint whose frozen models had other configs than ``current_configs``."""
    problems = frozen_config_problems(saved, {"frozen_configs": current_configs})
    if problems:
        raise CheckpointError(f"checkpoint in {where} was written by a different configuration: "
                              + _shown(problems))


def _shown(problems: list[str]) -> str:
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def note_changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> list[str]:
    """Logs one warning per setting a resumed run changed (``old -> new``); returns them."""
    old, new = saved.get("settings"), current.get("settings")
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return []
    changed = [f"{key} {old[key]!r} -> {new[key]!r}" for key in sorted(set(old) & set(new)) if old[key] != new[key]]
    for change in changed:
        log.warning("resuming %s with a changed setting: %s", where, change)
    return changed


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    problems = frozen_config_problems(saved, current)
    # Checkpoints from before the field existed were all written by encoder-only front ends.
    old_front, new_front = saved.get("speech_front_end", "encoder"), current.get("speech_front_end", "encoder")
    if old_front != new_front:
        problems.append(f"the adapter read {old_front!r} outputs, this configuration gives it {new_front!r}")
    for name, source in current["frozen_sources"].items():
        old = saved.get("frozen_sources", {}).get(name)
        if old != source:
            problems.append(f"frozen {name} was {old!r}, now {source!r}")
    old_shapes, new_shapes = saved.get("adapter_shapes", {}), current["adapter_shapes"]
    for key in sorted(set(old_shapes) | set(new_shapes)):
        if old_shapes.get(key) != new_shapes.get(key):
            problems.append(f"adapter{key} shape was {old_shapes.get(key)}, now {new_shapes.get(key)}")
    if problems:
        raise CheckpointError(f"checkpoint in {where} was written by a different configuration: {_shown(problems)}")
    note_changed_settings(saved, current, where)


# Room for TensorBoard event files, config.gin and Orbax's own metadata besides the arrays.
_SPACE_MARGIN_BYTES = 4 * 2**20


def bytes_needed(state_bytes: int, max_to_keep: int, existing_checkpoints: int = 0) -> int:
    """Disk space a run still needs: up to ``max_to_keep`` checkpoints plus the one being written
    before the oldest is deleted, less those already on disk."""
    keep = max(max_to_keep, 1) + 1
    return max(keep - existing_checkpoints, 1) * int(state_bytes) + _SPACE_MARGIN_BYTES


def ensure_writable(directory: str, min_free_bytes: int = 0) -> None:
    """Fails before training starts if the model directory cannot take checkpoints: read-only,
    not a directory, or less free space than ``min_free_bytes`` (a full disk found after an hour
    of training would lose that hour). The first write of a run: where a ``run_lock.RunLock`` is
    held for ``directory``, it is claimed here (another run's lock refuses this one). A bucket
    (``gs://``) must answer and exist; it has no free-space figure to check."""
    from slm_jax.training import run_lock

    paths.check_bucket(directory)
    try:
        paths.makedirs(directory)
        paths.probe_write(directory)
    except OSError as e:
        raise CheckpointError(f"model directory {directory} is not writable: {e.strerror or e}") from None
    free = None if paths.is_remote(directory) else shutil.disk_usage(directory).free
    if free is not None and free < min_free_bytes:
        raise CheckpointError(
            f"model directory {directory} has {free / 2**20:.1f} MiB free; checkpoints need about "
            f"{min_free_bytes / 2**20:.1f} MiB (free some space or choose another --model_dir)"
        )
    try:  # the run's first lasting write (after the checks, so a refused run leaves nothing)
        run_lock.claim(directory)
    except OSError as e:
        raise CheckpointError(f"model directory {directory} is not writable: {e.strerror or e}") from None


def complete_steps(directory: str) -> list[int]:
    """The complete (committed) checkpoint steps in ``directory``, oldest first, read without
    creating or changing anything there: a refused run must leave a model directory untouched."""
    paths.check_bucket(directory)
    if not paths.isdir(directory):
        return []
    # Orbax's own listing: it leaves out the temporary directories of uncommitted saves.
    return sorted(ocp.path.step.checkpoint_steps(paths.absolute(directory)))


def read_metadata(directory: str, step: int) -> dict[str, Any]:
    path = paths.join(directory, str(step), "meta", "metadata")
    try:
        with paths.open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {e}") from None


INTEGRITY_FILE = "integrity.json"


def _step_files(step_dir: str) -> dict[str, str]:
    """Relative path -> absolute path of every file under a step directory, but the manifest."""
    return {rel: path for rel, path in paths.files_under(step_dir).items() if rel != INTEGRITY_FILE}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with paths.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_integrity(step_dir: str) -> None:
    """Records size and SHA-256 of every file of a committed step (written atomically)."""
    table = {rel: {"bytes": paths.getsize(path), "sha256": _sha256(path)}
             for rel, path in sorted(_step_files(step_dir).items())}
    paths.write_file(paths.join(step_dir, INTEGRITY_FILE), json.dumps({"files": table}, indent=1))


# Recorded in the metadata of every step this module saves (inside Orbax's commit): such a step
# must have its integrity.json. A step without the key was written before the manifest existed.
INTEGRITY_KEY = "integrity_manifest"


def _promises_manifest(step_dir: str) -> bool:
    try:
        with paths.open(paths.join(step_dir, "meta", "metadata")) as f:
            return bool(json.load(f).get(INTEGRITY_KEY))
    except (OSError, ValueError, AttributeError):
        return False


def verify_integrity(step_dir: str) -> bool:
    """Checks a step against its ``integrity.json``; raises CheckpointError naming the first damaged
    file. A step whose metadata promises a manifest but has none (killed between Orbax's commit and
    the manifest, or the file was removed) cannot be verified and is refused. Returns False
    (nothing checked) for steps written before manifests existed (older checkpoints, releases)."""
    manifest = paths.join(step_dir, INTEGRITY_FILE)
    if not paths.exists(manifest):
        if _promises_manifest(step_dir):
            raise CheckpointError(
                f"checkpoint {step_dir} cannot be verified: it has no {INTEGRITY_FILE} (its save was cut off "
                "after Orbax committed it, or the file was removed), so damaged files could load unnoticed; "
                "delete that step directory to resume from an earlier one")
        return False
    try:
        with paths.open(manifest) as f:
            table = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: its {INTEGRITY_FILE} is unreadable ({e})") from None
    for rel, expected in table.items():
        path = paths.join(step_dir, rel)
        if not paths.isfile(path):
            problem = "is missing"
        elif paths.getsize(path) != expected["bytes"]:
            problem = f"is {paths.getsize(path)} bytes, {expected['bytes']} were written"
        elif _sha256(path) != expected["sha256"]:
            problem = "has changed since it was written (SHA-256 differs)"
        else:
            continue
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {rel} {problem}; "
                              "delete that step directory to resume from an earlier one")
    return True


def _remove_uncommitted_steps(directory: str) -> None:
    """In a bucket, Orbax writes a step in place and commits it with ``commit_success.txt``: step
    folders without one were cut off (never picked by ``latest_step``) and are removed."""
    if not paths.isdir(directory):
        return
    for name in paths.listdir(directory):
        step_dir = paths.join(directory, name)
        if name.isdigit() and not paths.exists(paths.join(step_dir, "commit_success.txt")):
            log.warning("removing %s: a save cut off before Orbax committed it", step_dir)
            paths.rmtree(step_dir)


class Checkpointer:
    """Saves and restores {state, data position, metadata} under ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = False, read_only: bool = False):
        self.directory = paths.absolute(directory)
        remote = paths.is_remote(self.directory)
        if remote and not read_only:
            _remove_uncommitted_steps(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save,
            # Remove the temporary directories of saves cut off by a crash (never picked anyway).
            # Not Orbax's in a bucket: there it takes every folder without a commit_success.txt
            # for a cut-off save, the TensorBoard folders train/ and eval/ included.
            cleanup_tmp_directories=not read_only and not remote,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_saved: int | None = self._manager.latest_step()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_position: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(dict(data_position)),
                meta=ocp.args.JsonSave({**metadata, INTEGRITY_KEY: 1}),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        if jax.process_index() == 0:  # one writer; the step is committed (all hosts) by now
            write_integrity(paths.join(self.directory, str(step)))
        self.last_saved = step

    def read_metadata(self, step: int) -> dict[str, Any]:
        return read_metadata(self.directory, step)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs)."""
        verify_integrity(paths.join(self.directory, str(step)))
        with _restore_errors(self.directory, step):
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        return restored["state"], dict(restored["data"])

    def close(self) -> None:
        self._manager.close()


@contextlib.contextmanager
def _restore_errors(directory: str, step: int):
    """Orbax's failures while reading step ``step`` as one CheckpointError line. The metadata was
    already checked against this model (check_compatible), so a failure here means missing or
    damaged files (truncated, overwritten) rather than another configuration."""
    try:
        yield
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint step {step} in {directory} is incomplete: {e}") from None
    except Exception as e:  # noqa: BLE001 - TensorStore raises bare Exception for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(
            f"checkpoint step {step} in {directory} is damaged and cannot be restored "
            f"({type(e).__name__}: {first}); delete that step directory to resume from an earlier one"
        ) from None


class Restored(NamedTuple):
    state: Any
    data_position: dict[str, Any]
    metadata: dict[str, Any]
    step: int
    directory: str


def restore_checkpoint(checkpoint: str, abstract_state: Any, frozen_sources: Mapping[str, str],
                       front_end: str | None = "encoder") -> Restored:
    """Restores ``checkpoint`` (a model directory, for its latest step, or one step directory) onto
    ``abstract_state`` after checking that it was written for these adapter shapes and frozen sources
    and for the ``front_end`` the adapter reads (None: any, for an adapter that only initialises a
    new run). The checkpoint's optimizer state must have the structure of ``abstract_state``'s (same
    optimizer)."""
    directory, step = find_checkpoint_dir(checkpoint)
    source = Checkpointer(directory, read_only=True)
    try:  # closed on refusal too: an open Orbax manager's threads fail noisily at exit
        metadata = source.read_metadata(step)
        if front_end is None:
            front_end = metadata.get("speech_front_end", "encoder")
        check_compatible(metadata, describe_state(abstract_state.adapter_params, frozen_sources, front_end), directory)
        state, position = source.restore(step, abstract_state)
    finally:
        source.close()
    return Restored(state, position, metadata, step, directory)


def restore_adapter(checkpoint: str, abstract_adapter: Any, frozen_sources: Mapping[str, str],
                    front_end: str = "encoder", **describe: Any) -> Restored:
    """The adapter parameters alone of ``checkpoint`` (a model or step directory), onto the
    shardings of ``abstract_adapter`` (ShapeDtypeStructs): what inference reads. No optimizer
    state is restored, so reading an adapter needs neither the optimizer nor its settings. The
    same checks as ``restore_checkpoint`` (metadata, integrity) come first. ``Restored.state``
    is the adapter tree."""
    directory, step = find_checkpoint_dir(checkpoint)
    metadata = read_metadata(directory, step)
    check_compatible(metadata, describe_state(abstract_adapter, frozen_sources, front_end, **describe), directory)
    verify_integrity(paths.join(directory, str(step)))
    target = {"adapter_params": abstract_adapter}
    with _restore_errors(directory, step):
        restored = ocp.PyTreeCheckpointer().restore(
            paths.join(directory, str(step), "state"),
            args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                        partial_restore=True))
    return Restored(restored["adapter_params"], {}, metadata, step, directory)


def find_checkpoint_dir(path: str) -> tuple[str, int]:
    """Accepts a model directory (latest step) or a step directory; returns (model dir, step)."""
    paths.check_bucket(path, "checkpoint")
    path = paths.absolute(path)
    if not paths.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}: directory does not exist")
    base = paths.basename(path)
    if base.isdigit() and paths.isdir(paths.join(path, "state")):
        return paths.dirname(path), int(base)
    steps = [int(d) for d in paths.listdir(path) if d.isdigit() and paths.isdir(paths.join(path, d, "state"))]
    if not steps:
        raise CheckpointError(f"no checkpoint in {path}: it holds no completed step directories")
    return path, max(steps)
