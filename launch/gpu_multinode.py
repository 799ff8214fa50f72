#!/usr/bin/env python3
"""Train slm-jax across several GPU nodes reachable by ssh (node 0 coordinates).

  python launch/gpu_multinode.py --host=gpu-a --host=gpu-b --gin_file=gin/gpu.gin \
      --model_dir=/shared/runs/gpu --dry_run

Each node must hold the project at --remote_dir with `make install` done and share model_dir
(e.g. NFS). --dry_run prints the commands instead of running them.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from slm_jax.parallel.launching import REMOTE_DIR, gpu_multinode_commands  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", action="append", required=True, help="a node's ssh name (repeatable; first = coordinator)")
    p.add_argument("--port", type=int, default=12355, help="coordinator port on the first host")
    p.add_argument("--gin_file", action="append", required=True)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--remote_dir", default=REMOTE_DIR)
    p.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--dry_run", action="store_true")
    args = p.parse_args(argv)
    commands = gpu_multinode_commands(args.host, args.port, args.gin_file, args.model_dir, args.gin, args.remote_dir)
    script = "\n".join(commands)
    print(script, flush=True)
    if not args.dry_run:
        subprocess.run(["bash", "-c", script], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
