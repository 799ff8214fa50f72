"""Model directories and converted weights in a bucket (gs://), against a local Cloud Storage
emulator on 127.0.0.1 that the test starts (gcp-storage-emulator, in memory): nothing leaves the
machine. slm-train writes its checkpoints (Orbax through TensorStore), metadata, integrity
manifests, config.gin and TensorBoard events into gs://bkt/run, resumes there with the losses of
an uninterrupted run, and the adapter restores from it. A bucket that does not exist,
or a storage service that cannot be reached, is one line naming the bucket (exit status 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import reliability_support as rs
from slm_jax.training import paths

BUCKET = "bkt"
# The emulator's downloads lack the x-goog-generation header that Cloud Storage sends with every
# object it serves; TensorStore reads an object's generation from it (without it: "Malformed
# StorageGeneration"). Added here, to the emulator only.
EMULATOR = f"""
import sys
from gcp_storage_emulator.handlers import objects
_download = objects.download

def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

objects.download = download
from gcp_storage_emulator.server import create_server
server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket={BUCKET!r})
server.start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
server.stop()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_env(port: int) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}"
    # Credentials and the metadata server are never asked (nothing may leave the machine).
    dead = "127.0.0.1:9"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "EPATH_USE_TF": "false",
            # The emulator has no storage-control API (zonal/hierarchical bucket lookups).
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": dead, "GCE_METADATA_IP": dead, "GCE_METADATA_ROOT": dead,
            "GOOGLE_APPLICATION_CREDENTIALS": ""}


@pytest.fixture(scope="module")
def emulator():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        env = _emulator_env(port)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                if value:
                    mp.setenv(key, value)
                else:
                    mp.delenv(key, raising=False)
            yield env
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _objects(prefix: str) -> list[str]:
    """Object names under gs://bkt/PREFIX, relative to it."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
    top = f"{BUCKET}/{prefix}"
    return sorted(name[len(top) + 1:] for name in fs.find(top))


def _run(module: str, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *args] if module.startswith("slm_jax") else [sys.executable, module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=rs.ROOT, env=rs.subprocess_env(**env),
                          timeout=timeout)


def _losses(record) -> dict[int, str]:
    return {r["step"]: r["loss"] for r in rs.read_record(record)}


def test_local_paths_are_handled_as_before(tmp_path):
    local = os.fspath(tmp_path / "run")
    assert not paths.is_remote(local) and not paths.is_remote("runs/x") and paths.is_remote("gs://b/x")
    assert paths.absolute("runs/x") == os.path.abspath("runs/x")
    assert paths.join(local, "3", "state") == os.path.join(local, "3", "state")
    assert paths.dirname(local) == os.path.dirname(local) and paths.basename(local) == "run"
    paths.check_bucket(local)  # nothing to check for a local path
    # Bucket paths are normalised, never made absolute (not ./gs:/b/x).
    assert paths.absolute("gs://b/x/") == "gs://b/x"
    assert paths.join("gs://b/x/", "3", "state") == "gs://b/x/3/state"
    assert paths.dirname("gs://b/x/3") == "gs://b/x" and paths.basename("gs://b/x/3/") == "3"
    assert paths.bucket("gs://b/x/3") == "gs://b"


@pytest.mark.slow
def test_train_resume_and_restore_in_a_bucket(emulator, tmp_path):
    gin_file = rs.write_config(tmp_path / "run.gin", "CHECKPOINT_EVERY = 2\n")
    model_dir = f"gs://{BUCKET}/run"
    record = tmp_path / "record.jsonl"
    env = {**emulator, "SLM_HARNESS_RECORD": os.fspath(record)}

    first = _run(rs.HARNESS, env, f"--gin_file={gin_file}", f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "lock is not available" in first.stderr  # a bucket has no file locks: said, not pretended
    objects = _objects("run")
    assert {"2/integrity.json", "3/integrity.json", "3/commit_success.txt", "3/meta/metadata",
            "config.gin"} <= set(objects), objects
    assert any(o.startswith("train/events.out.tfevents.") for o in objects), objects
    assert not os.path.exists(os.path.join(rs.ROOT, "gs:")), "a local ./gs: folder was made"

    second = _run(rs.HARNESS, env, f"--gin_file={gin_file}", f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from step 3" in second.stderr
    resumed = _losses(record)
    assert sorted(resumed) == [1, 2, 3, 4, 5]

    # The same steps without interruption, in a local directory: the same losses, bit for bit.
    reference_record = tmp_path / "reference.jsonl"
    reference = _run(rs.HARNESS, {"SLM_HARNESS_RECORD": os.fspath(reference_record)}, f"--gin_file={gin_file}",
                     f"--model_dir={tmp_path / 'local'}", "--gin.TRAIN_STEPS=5")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert _losses(reference_record) == resumed

    from slm_jax.training import checkpointing, event_files

    assert checkpointing.complete_steps(model_dir) == [3, 4, 5]  # max_to_keep = 3
    assert "config.gin" in _objects("run")
    assert checkpointing.verify_integrity(f"{model_dir}/5") is True
    assert checkpointing.find_checkpoint_dir(model_dir + "/") == (model_dir, 5)
    assert checkpointing.read_metadata(model_dir, 5)["step"] == 5
    events = [o for o in _objects("run") if o.startswith("train/events.out.tfevents.")]
    steps = {name: sorted(step for step, tag, _ in event_files.read_scalars(f"{model_dir}/{name}") if tag == "loss")
             for name in events}
    assert sorted(s for logged in steps.values() for s in logged) == [1, 2, 3, 4, 5], steps

    # The adapter restores from the bucket (inference's partial restore: no optimizer state), equal
    # to the uninterrupted local run's. (slm-infer and slm-eval need a corpus's vocabulary, which the
    # synthetic data of this config has not.)
    import jax
    import orbax.checkpoint as ocp

    local = ocp.PyTreeCheckpointer().restore(os.fspath(tmp_path / "local" / "5" / "state"))["adapter_params"]
    target = {"adapter_params": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), local)}
    restored = ocp.PyTreeCheckpointer().restore(
        f"{model_dir}/5/state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), np.asarray(want)),
                 restored["adapter_params"], local)


def test_converted_weights_in_a_bucket(emulator):
    import jax

    from tiny_models import llm_config
    from slm_jax.weights.convert import converted

    cfg = llm_config("llama")
    params = {"embed": np.arange(12, dtype=np.float32).reshape(3, 4), "norm": np.ones(4, np.float32)}
    converted.save(f"gs://{BUCKET}/conv", "llama", cfg, params, source="test")
    assert {"slm_convert.json", "model.gin"} <= set(_objects("conv"))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in params.items()}
    restored = converted.restore(f"gs://{BUCKET}/conv", cfg, abstract)
    for key, value in params.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), value)
    assert converted.saved_config(f"gs://{BUCKET}/conv") == cfg


@pytest.mark.slow
def test_missing_or_unreachable_bucket_is_one_line(emulator, tmp_path):
    gin_file = rs.write_config(tmp_path / "run.gin")
    missing = _run("slm_jax.cli.train", emulator, f"--gin_file={gin_file}", "--model_dir=gs://no-such-bucket/run",
                   "--gin.TRAIN_STEPS=2")
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert rs.error_lines(missing.stderr) == [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(rs.error_lines(missing.stderr)) == 1 and "gs://no-such-bucket does not exist" in missing.stderr

    dead = f"http://127.0.0.1:{_free_port()}"
    started = time.time()
    unreachable = _run("slm_jax.cli.train", {**emulator, "STORAGE_EMULATOR_HOST": dead, "TENSORSTORE_GCS_HTTP_URL": dead},
                       f"--gin_file={gin_file}", f"--model_dir=gs://{BUCKET}/run2", "--gin.TRAIN_STEPS=2")
    assert unreachable.returncode == 2, unreachable.stderr[-3000:]
    lines = rs.error_lines(unreachable.stderr)
    assert len(lines) == 1 and f"gs://{BUCKET}" in lines[0] and "cannot reach" in lines[0], unreachable.stderr
    assert "Traceback" not in unreachable.stderr and time.time() - started < 60
    assert not os.path.exists(os.path.join(rs.ROOT, "gs:"))
