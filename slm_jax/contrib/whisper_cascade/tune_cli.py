"""slm-tune-whisper: train a low-rank adapter (LoRA) on the transcriber front end's Whisper decoder."""

from __future__ import annotations

import json
import os
import sys

from slm_jax.cli import common

DESCRIPTION = """\
Train a low-rank adapter on the frozen Whisper decoder of a transcriber front end (a gin config
whose speech encoder is a WhisperTranscriberConfig, e.g. gin/cascade/whisper_base_transcriber_speeds_smollm2.gin)
with Whisper's own next-token loss on a corpus's transcripts, and write its factors to --out (.npz).
Every pretrained weight stays frozen; only the factors train. The front end uses them with
--gin.WhisperTranscriberConfig.decoder_lora="'OUT'" (its cached transcripts are keyed by the
file's content, so they are made again).

The frozen encoder reads each utterance once (as it is, and --speed_copies copies at speeds drawn
from the config's speeds), then the factors train for --steps steps. Every example's spoken text
is a transcript (ASR and speech-translation tasks alike; zero-shot tasks are left out).

examples:
  slm-tune-whisper --gin_file=gin/cascade/whisper_base_transcriber_speeds_smollm2.gin --corpus_dir=runs/corpus \\
      --out=runs/whisper_lora.npz
  slm-tune-whisper --gin_file=gin/cascade/whisper_base_transcriber_smollm2.gin --corpus_dir=runs/corpus \\
      --out=runs/whisper_lora.npz --steps=600 --rank=8 --tasks=asr_en,asr_en_open
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        rest, overrides = common.split_gin_overrides(argv)
        parser = common.gin_argument_parser("slm-tune-whisper", DESCRIPTION)
        parser.add_argument("--corpus_dir", required=True, help="a corpus of slm-make-corpus")
        parser.add_argument("--out", required=True, help="the LoRA file to write (.npz)")
        parser.add_argument("--splits", type=common.comma_separated("train"), default=["train"],
                            help="the corpus splits to train on (default: train)")
        parser.add_argument("--tasks", type=common.comma_separated("asr_en,asr_en_open"), default=None,
                            help="the corpus tasks to train on (default: all but the zero-shot ones)")
        parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default %(default)s)")
        parser.add_argument("--batch_size", type=int, default=16, help="utterances a step (default %(default)s)")
        parser.add_argument("--rank", type=int, default=16, help="the factors' rank (default %(default)s)")
        parser.add_argument("--learning_rate", type=float, default=5e-4, help="peak, after warm-up (default %(default)s)")
        parser.add_argument("--speed_copies", type=int, default=1,
                            help="extra copies of each utterance at speeds drawn from the config's speeds "
                                 "(default %(default)s; none when the config has no speeds)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--encoded", default=None, metavar="PATH",
                            help="keep the frozen encoder's outputs in PATH (.npz) and read them back in a "
                                 "later run with the same config, corpus, tasks, splits, --speed_copies and "
                                 "--seed (another run's file is refused)")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        args = parser.parse_args(rest)
        if not args.gin_file:
            raise common.UserError("give --gin_file, the transcriber config whose Whisper decoder to tune")
        if os.path.exists(args.out) and not args.overwrite:
            raise common.UserError(f"{args.out} exists; pass --overwrite to replace it")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise common.UserError(f"cannot write {args.out}: directory {out_dir} does not exist")
        common.setup_logging()
        common.parse_gin(args.gin_file, args.gin_bindings + overrides)
        import gin

        from slm_jax.weights import frozen
        from slm_jax.contrib.whisper_cascade import tuning as whisper_tuning
        from slm_jax.data.cached.corpus_data import read_corpus
        from slm_jax.data.corpus import builder as corpus
        from slm_jax.contrib.whisper_cascade import lora
        from slm_jax.contrib.whisper_cascade.front_end import WhisperTranscriberConfig

        try:
            tuning = whisper_tuning.WhisperTuningConfig(
                rank=args.rank, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                speed_copies=args.speed_copies, seed=args.seed)
        except ValueError as e:
            raise common.UserError(str(e)) from None
        model = gin.query_parameter("train.model").scoped_configurable_fn()
        config = model.speech_encoder
        if not isinstance(config, WhisperTranscriberConfig):
            raise common.UserError(f"{', '.join(args.gin_file)}: the speech encoder is a {type(config).__name__}, "
                                   "not a WhisperTranscriberConfig; only a transcriber front end has a Whisper "
                                   "decoder to tune")
        manifest = corpus.load_manifest(args.corpus_dir)
        known = sorted(name for name, info in manifest["tasks"].items() if not info["zero_shot"])
        tasks = args.tasks or known
        unknown = sorted(set(tasks) - set(known))
        if unknown:
            raise common.UserError(f"unknown --tasks {','.join(unknown)} in {args.corpus_dir}; known: {','.join(known)}")
        examples = read_corpus(args.corpus_dir, args.splits, tasks)
        if not examples:
            raise common.UserError(f"no {','.join(args.splits)} examples of {','.join(tasks)} in {args.corpus_dir}")

        plain = whisper_tuning.frozen_transcriber(config)  # trained on Whisper as released, not on an earlier LoRA
        params = frozen.load_on_host(plain, model.speech_encoder_source)
        key = json.dumps({"front_end": repr(plain),
                          "source": model.speech_encoder_source, "corpus": os.path.abspath(args.corpus_dir),
                          "manifest_seconds": manifest.get("generation_seconds"), "splits": args.splits,
                          "tasks": tasks, "speed_copies": args.speed_copies, "seed": args.seed}, sort_keys=True)
        try:
            if args.encoded and os.path.exists(args.encoded):
                encoded = whisper_tuning.load_examples(args.encoded, key)
            else:
                encoded = whisper_tuning.encode_examples(
                    config, params, examples, tuning,
                    progress=iter if args.quiet else (lambda it: _tqdm(it, desc="encoding", unit="utt")))
                if args.encoded:
                    whisper_tuning.save_examples(args.encoded, encoded, key)
        except ValueError as e:
            raise common.UserError(str(e)) from None
        losses = []
        bar = None if args.quiet else _tqdm(total=tuning.steps, desc="training", unit="step")

        def on_step(step, loss):
            losses.append(loss)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{_mean(losses[-10:]):.3f}")

        factors = whisper_tuning.train(config, params, encoded, tuning, on_step=on_step)
        if bar is not None:
            bar.close()
        first, last = _mean(losses[:10]), _mean(losses[-10:])
        metadata = {
            "base": model.speech_encoder_source, "corpus_dir": os.path.abspath(args.corpus_dir),
            "splits": ",".join(args.splits), "tasks": ",".join(tasks), "utterances": str(len(examples)),
            "copies": str(len(encoded)), "steps": str(tuning.steps), "rank": str(tuning.rank),
            "learning_rate": str(tuning.learning_rate), "batch_size": str(tuning.batch_size),
            "loss_first_10_steps": f"{first:.4f}", "loss_last_10_steps": f"{last:.4f}",
        }
        sha = lora.save(args.out, factors, tuning.scale, metadata)
        print(json.dumps({"out": args.out, "sha256": sha, **metadata}, indent=1))
        print(f"use it: --gin.WhisperTranscriberConfig.decoder_lora=\"'{args.out}'\"")
        return 0

    return common.run_main("slm-tune-whisper", run)


def _mean(values):
    return sum(values) / max(len(values), 1)


def _tqdm(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
