"""slm-plan: will a configuration fit? Per-device bytes of parameters, optimizer state and
activations for one or more meshes, computed on fake host devices without allocating weights."""

from __future__ import annotations

import math
import os
import sys

from slm_jax.cli import common

DESCRIPTION = """\
Print per-device memory for a gin configuration on one or more device meshes.

Parameters and optimizer state come from jax.eval_shape and the sharding rules; activations and
workspace from compiling the real train step on fake CPU devices (XLA memory analysis). Nothing
is allocated, so a 15B-parameter configuration plans on a laptop.

examples:
  slm-plan --gin_file=gin/runs/paper_usm_mt0xxl.gin --mesh=v4-64 --mesh=8xh100
  slm-plan --gin_file=gin/runs/tiny.gin --mesh=data=2,model=4 --batch_size=8
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        rest, overrides = common.split_gin_overrides(argv)
        from slm_jax.parallel.planning import MESH_PRESETS

        parser = common.gin_argument_parser("slm-plan", DESCRIPTION)
        parser.add_argument("--mesh", action="append", default=[],
                            help=f"mesh 'data=D,fsdp=F,model=M' or a preset: {', '.join(MESH_PRESETS)} (repeatable)")
        parser.add_argument("--batch_size", type=int, default=None, help="global batch (default: the config's)")
        parser.add_argument("--audio_frames", type=int, default=None, help="log-mel frames per example")
        parser.add_argument("--prompt_tokens", type=int, default=32, help="text tokens before+after the speech")
        parser.add_argument("--target_tokens", type=int, default=None)
        parser.add_argument("--no_compile", action="store_true", help="skip the compiled step (params/optimizer only)")
        parser.add_argument("--device_memory_gib", type=float, default=None, help="say whether each mesh fits")
        args = parser.parse_args(rest)
        if not args.gin_file:
            raise common.UserError("give a --gin_file")
        for flag in ("batch_size", "audio_frames", "target_tokens", "prompt_tokens"):
            value = getattr(args, flag)
            if value is not None and value < (0 if flag == "prompt_tokens" else 1):
                raise common.UserError(f"--{flag} must be >= {0 if flag == 'prompt_tokens' else 1}, got {value}")
        if args.device_memory_gib is not None and not args.device_memory_gib > 0:  # also refuses nan
            raise common.UserError(f"--device_memory_gib must be > 0, got {args.device_memory_gib}")
        meshes = args.mesh or ["8xh100"]
        from slm_jax.parallel.planning import check_batch, mesh_from_spec

        try:
            shapes = [mesh_from_spec(m) for m in meshes]
            if args.batch_size is not None:
                for shape in shapes:
                    check_batch(shape, args.batch_size)
        except ValueError as e:
            raise common.UserError(str(e)) from None
        # Fake host devices must be requested before jax initialises its backend.
        needed = max(math.prod(s.values()) for s in shapes)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={needed}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        common.setup_logging(args.verbose)
        common.parse_gin(args.gin_file, args.gin_bindings + overrides)
        from slm_jax.parallel import planning

        common.start_backend_quietly()
        model, batch, lengths = common.configured_step_shape(args.batch_size, args.audio_frames, args.prompt_tokens,
                                                             args.target_tokens)
        print(f"global batch {batch}, feature lengths {lengths}")
        plans = []
        for shape in shapes:
            try:
                planning.check_batch(shape, batch)
                p = planning.plan(model, shape, batch, lengths, compile_step=not args.no_compile)
            except planning.PlanningError as e:
                raise common.UserError(str(e)) from None
            if p.compile_seconds is not None:
                print(f"compiled the train step for {shape} in {p.compile_seconds:.1f} s")
            plans.append(p)
        print(planning.format_plans(plans, args.device_memory_gib))
        if args.no_compile and args.device_memory_gib:
            print("--no_compile: activations and workspace were not counted; plan without it to know whether "
                  "a train step fits")
        return 0

    return common.run_main("slm-plan", run)


if __name__ == "__main__":
    sys.exit(main())
