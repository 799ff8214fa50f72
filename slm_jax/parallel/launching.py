"""Builds the shell commands that put slm-train on every worker of a Cloud TPU pod slice or of a
multi-node GPU cluster. The launch/ scripts print them (--dry_run) or run them."""

from __future__ import annotations

import shlex
from typing import Sequence

REMOTE_DIR = "~/slm-jax"


def _q(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def train_args(gin_files: Sequence[str], model_dir: str, overrides: Sequence[str]) -> list[str]:
    args = [f"--gin_file={g}" for g in gin_files] + [f"--model_dir={model_dir}"]
    return args + [f"--gin.{o}" for o in overrides]


def tpu_pod_commands(
    name: str, zone: str, accelerator_type: str, runtime_version: str, project: str | None,
    gin_files: Sequence[str], model_dir: str, overrides: Sequence[str] = (), source_tarball: str = "slm-jax.tar.gz",
    spot: bool = False,
) -> list[str]:
    """create slice -> copy code to all workers -> install on all workers -> train on all workers.

    Every worker runs the same slm-train command; ``--multihost`` makes each call
    ``jax.distributed.initialize()`` (TPU pods auto-detect coordinator and process ids), read
    only its own shard of the data, and write checkpoints collectively (model_dir should be a
    gs:// bucket path on a pod).
    """
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    create = base + ["create", name, f"--accelerator-type={accelerator_type}", f"--version={runtime_version}"] + where
    if spot:
        create.append("--spot")
    remote_setup = f"mkdir -p {REMOTE_DIR} && tar -xzf {source_tarball} -C {REMOTE_DIR} && cd {REMOTE_DIR} && make install"
    train = (
        f"cd {REMOTE_DIR} && .venv/bin/pip install -q 'jax[tpu]==0.10.2' && "
        + _q([".venv/bin/slm-train", "--multihost"] + train_args(gin_files, model_dir, overrides))
    )
    return [
        f"git archive --format=tar.gz -o {source_tarball} HEAD",
        _q(create),
        _q(base + ["scp", source_tarball, f"{name}:~/", "--worker=all"] + where),
        _q(base + ["ssh", name, "--worker=all", f"--command={remote_setup}"] + where),
        _q(base + ["ssh", name, "--worker=all", f"--command={train}"] + where),
    ]


def gpu_multinode_commands(
    hosts: Sequence[str], coordinator_port: int, gin_files: Sequence[str], model_dir: str,
    overrides: Sequence[str] = (), remote_dir: str = REMOTE_DIR,
) -> list[str]:
    """One ssh per node; node 0 is the coordinator. Each node drives all its local GPUs."""
    if not hosts:
        raise ValueError("give at least one host")
    coordinator = f"{hosts[0]}:{coordinator_port}"
    commands = []
    for i, host in enumerate(hosts):
        train = _q(
            [".venv/bin/slm-train", "--multihost", f"--coordinator_address={coordinator}",
             f"--num_processes={len(hosts)}", f"--process_id={i}"]
            + train_args(gin_files, model_dir, overrides)
        )
        commands.append(_q(["ssh", host, f"cd {remote_dir} && {train}"]) + " &")
    commands.append("wait")
    return commands
