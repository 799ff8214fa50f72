"""slm-train: train an SLM adapter (frozen speech encoder and LLM) from gin configs."""

from __future__ import annotations

import os
import sys

from slm_jax.cli import common

DESCRIPTION = """\
Train the adapter of a speech-language model. The speech encoder and the LLM stay frozen;
only the adapter gets gradients, optimizer state and checkpoints.

Running the same command again resumes from the latest checkpoint in --model_dir (parameters,
optimizer state, step and data position). SIGTERM saves a checkpoint and exits.
To fine-tune instead, start a new --model_dir from another run's adapter (or a release) with
--gin.train.init_checkpoint="'DIR'": step 0, fresh optimizer state and schedule.
Progress goes to the console and to TensorBoard event files in MODEL_DIR/train and MODEL_DIR/eval.

examples:
  slm-train --gin_file=gin/runs/tiny.gin --model_dir=runs/tiny --gin.TRAIN_STEPS=50
  slm-train --gin_file=gin/runs/whisper_base_smollm2.gin --model_dir=runs/default
  slm-train --gin_file=gin/runs/whisper_base_smollm2.gin --model_dir=runs/tuned \
      --gin.train.init_checkpoint="'release/whisper_base_smollm2'" --gin.CORPUS_DIR="'data/mine'"
"""


def _check_corpus() -> None:
    """A corpus-backed data source whose corpus directory is missing or unfinished: one line now,
    not a TensorFlow NotFoundError from inside the input pipeline."""
    import gin

    from slm_jax.data.corpus.builder import MANIFEST

    try:
        reference = gin.query_parameter("train.data")
    except ValueError:
        return
    if not hasattr(reference, "scoped_configurable_fn"):
        return
    data = reference.scoped_configurable_fn()
    corpus_dir = getattr(data, "corpus_dir", None)
    if not isinstance(corpus_dir, str) or not corpus_dir:
        return
    if not os.path.isdir(corpus_dir):
        raise common.UserError(f"corpus directory {corpus_dir} does not exist (CORPUS_DIR); make it with "
                               f"slm-make-corpus --out={corpus_dir} --size=2000, or pass --gin.CORPUS_DIR=\"'DIR'\"")
    if not os.path.exists(os.path.join(corpus_dir, MANIFEST)):
        raise common.UserError(f"{corpus_dir} is not a finished corpus: it has no {MANIFEST} (its generation was "
                               f"interrupted, or it is another folder); make it with slm-make-corpus --out={corpus_dir}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        rest, overrides = common.split_gin_overrides(argv)
        parser = common.gin_argument_parser("slm-train", DESCRIPTION)
        parser.add_argument("--model_dir", required=True, help="where checkpoints, logs and config.gin go")
        multihost = parser.add_argument_group("multi-host (TPU pods, multi-node GPU)")
        multihost.add_argument("--multihost", action="store_true",
                               help="call jax.distributed.initialize() first (auto-detected on Cloud TPU pods)")
        multihost.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (GPU clusters)")
        multihost.add_argument("--num_processes", type=int, default=None)
        multihost.add_argument("--process_id", type=int, default=None)
        args = parser.parse_args(rest)
        if not args.gin_file:
            raise common.UserError("give at least one --gin_file (e.g. gin/runs/tiny.gin)")
        common.setup_logging(args.verbose)
        from slm_jax.training import paths

        paths.check_bucket(args.model_dir, "--model_dir")  # gs://: the bucket answers and exists (one line if not)
        common.parse_gin(args.gin_file, args.gin_bindings + overrides)
        if args.multihost or args.coordinator_address:
            import jax

            jax.distributed.initialize(
                coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                process_id=args.process_id,
            )
        common.start_backend_quietly(tensorflow=common.data_needs_tensorflow())
        _check_corpus()
        from slm_jax.training import loop as train

        metrics = train.train(args.model_dir)
        if metrics.get("preempted"):
            print(f"stopped at step {metrics['step']} by SIGTERM; checkpoint saved in {args.model_dir}; "
                  "run the same command to resume")
        elif "loss" in metrics:
            print(f"finished at step {metrics['step']}: loss {metrics['loss']:.4f}")
        return 0

    return common.run_main("slm-train", run)


if __name__ == "__main__":
    sys.exit(main())
