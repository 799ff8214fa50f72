#!/usr/bin/env python3
"""Create a Cloud TPU VM pod slice and train slm-jax on all its workers.

  python launch/tpu_pod.py --name=slm-v4 --zone=us-central2-b --accelerator_type=v4-64 \
      --gin_file=gin/runs/paper_usm_mt0xxl.gin --model_dir=gs://BUCKET/runs/paper --dry_run

--dry_run prints the commands instead of running them (always try it first).
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from slm_jax.parallel.launching import tpu_pod_commands  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator_type", default="v4-64", help="e.g. v4-64, v5litepod-64, v5p-128")
    p.add_argument("--runtime_version", default="tpu-ubuntu2204-base")
    p.add_argument("--project", default=None)
    p.add_argument("--gin_file", action="append", required=True)
    p.add_argument("--model_dir", required=True, help="a gs:// path shared by all workers")
    p.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE", help="gin override (repeatable)")
    p.add_argument("--spot", action="store_true", help="spot/preemptible capacity (SIGTERM -> checkpoint)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    commands = tpu_pod_commands(
        args.name, args.zone, args.accelerator_type, args.runtime_version, args.project,
        args.gin_file, args.model_dir, args.gin, spot=args.spot,
    )
    for c in commands:
        print(c, flush=True)
        if not args.dry_run:
            subprocess.run(c, shell=True, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
