"""Launch scripts: their --dry_run output is the exact command sequence a pod would run."""

import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(script, *args) -> list[str]:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args, "--dry_run"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()


def test_tpu_pod_dry_run_creates_copies_installs_and_trains_on_all_workers():
    lines = _dry_run("tpu_pod.py", "--name=slm-v4", "--zone=us-central2-b", "--accelerator_type=v4-64",
                     "--gin_file=gin/runs/paper_usm_mt0xxl.gin", "--model_dir=gs://b/runs/p", "--gin=TRAIN_STEPS=10")
    assert lines[0].startswith("git archive")
    assert lines[1].startswith("gcloud compute tpus tpu-vm create slm-v4 --accelerator-type=v4-64")
    assert "--zone=us-central2-b" in lines[1]
    assert shlex.split(lines[2])[4:8] == ["scp", "slm-jax.tar.gz", "slm-v4:~/", "--worker=all"]
    assert "--worker=all" in lines[3] and "make install" in lines[3]
    train = lines[4]
    assert "--worker=all" in train and "slm-train --multihost" in train
    assert "--gin_file=gin/runs/paper_usm_mt0xxl.gin" in train and "--model_dir=gs://b/runs/p" in train
    assert "--gin.TRAIN_STEPS=10" in train


def test_gpu_multinode_dry_run_assigns_process_ids_and_one_coordinator():
    lines = _dry_run("gpu_multinode.py", "--host=a", "--host=b", "--port=4000", "--gin_file=gin/runs/tiny.gin",
                     "--model_dir=/shared/run")
    assert len(lines) == 3 and lines[-1] == "wait"
    for i, host in enumerate("ab"):
        assert lines[i].startswith(f"ssh {host} ")
        assert f"--process_id={i}" in lines[i] and "--num_processes=2" in lines[i]
        assert "--coordinator_address=a:4000" in lines[i]
