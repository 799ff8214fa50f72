"""slm-demo: the first command (make demo): corpus -> frozen encoder pass -> adapter training ->
results table next to a text cascade, inside a time budget."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from slm_jax.cli import common

DESCRIPTION = """\
Train and show a speech language model on this machine, offline: frozen pretrained Whisper-base
(speech encoder) and frozen SmolLM2-135M-Instruct (LLM), both from pip packages, joined by a
2-layer adapter that this command trains.

  1. synthesise a speech corpus with espeak-ng (ASR, speech translation, instruction tasks, and
     zero-shot tasks whose instructions never occur in training) into OUT_DIR/corpus;
  2. run the frozen encoder once over it (cached) and measure this machine's train step;
  3. train the adapter: first --alignment_steps cheap CTC steps that align its outputs with the
     LLM's token embeddings, then next-token steps through the frozen LLM, as many as fit the
     time budget (or --steps);
  4. evaluate on held-out speech: WER (ASR), BLEU (translation), accuracy (instructions), for
     the adapter trained just now AND the shipped release of the same design
     (release/whisper_base_smollm2, 1,100 steps) on the same utterances, next to the cascade
     baseline (the same LLM given the reference transcript, and given the release's own
     transcript, asked for the corpus's answer format), and say plainly what was measured;
  5. real human speech (release/real_speech/transcripts.tsv, 7 recordings): the shipped release,
     Whisper-base alone and Whisper-base -> LLM, each with its WER; then your own --wav files.

On a busy machine the live run gets few steps and learns little: the demo says so, and the
shipped release's column shows what the design reaches. The release's evaluation and the
real-speech section are inside the time budget (the live run trains for less).

OUT_DIR/train is replaced on every run (unless --resume); the corpus and the encoder cache are
reused.

examples:
  slm-demo                       # about 23 minutes on a 2-core CPU
  slm-demo --quick               # about 5 minutes: smaller corpus, fewer steps
  slm-demo --steps=300 --out_dir=runs/demo300
  slm-demo --quick --wav=me.wav  # your own recording (up to 29 s), transcribed at the end
"""


def build_parser() -> argparse.ArgumentParser:
    defaults = common_defaults()
    parser = common.gin_argument_parser("slm-demo", DESCRIPTION)
    parser.add_argument("--out_dir", default=defaults.out_dir, help="where the corpus, run and report go")
    parser.add_argument("--quick", action="store_true", help="the 5-minute version")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"time budget for the whole demo (default {defaults.minutes:g}; --quick: 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many next-token steps after the alignment steps (no budget sizing)")
    parser.add_argument("--alignment_steps", type=int, default=None,
                        help=f"CTC alignment steps before the next-token steps (default {defaults.alignment_steps}; "
                             "--quick: 150; 0: none). Cheap: no LLM forward pass")
    parser.add_argument("--corpus_size", type=int, default=None,
                        help=f"utterances to synthesise (default {defaults.corpus_size}; --quick: 400)")
    parser.add_argument("--open_asr", type=int, default=0,
                        help="also synthesise this many free-form English sentences (task asr_en_open, "
                             "Wikipedia-like word sequences) for a wider vocabulary; used by the release run")
    parser.add_argument("--languages", default=",".join(defaults.languages),
                        help="speech/target languages of the corpus (en, fr, de, es)")
    parser.add_argument("--synthesizer", default=defaults.synthesizer, choices=["espeak", "tones"],
                        help="'tones' is a stand-in without espeak-ng (nothing real to learn)")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--checkpoint_every", type=int, default=None,
                        help="save every N steps (default: only at the end; for long runs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUT_DIR/train (same --steps) instead of starting afresh")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--eval_per_task", type=int, default=None,
                        help=f"test utterances per task (default {defaults.eval_per_task}; --quick: 4)")
    parser.add_argument("--no_release", action="store_true",
                        help=f"do not evaluate the shipped release ({defaults.release}) next to the live run "
                             "(saves its load and its answers: about a minute on a 2-core CPU)")
    parser.add_argument("--no_real_speech", action="store_true",
                        help=f"skip the real-speech section ({defaults.real_speech})")
    parser.add_argument("--wav", action="append", default=[], metavar="PATH",
                        help="your own recording (wav/flac/ogg, up to 29 s; repeatable), transcribed at the end by "
                             "the shipped release, Whisper-base alone and the cascade")
    return parser


def common_defaults():
    from slm_jax.apps.demo import DemoSettings

    return DemoSettings()


def settings_from_args(args: argparse.Namespace):
    from slm_jax.apps.demo import QUICK, DemoSettings

    values = dict(QUICK) if args.quick else {}
    for name in ("minutes", "steps", "corpus_size", "eval_per_task", "checkpoint_every", "alignment_steps"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if values.get("alignment_steps", 0) < 0:
        raise common.UserError(f"--alignment_steps must be 0 or more, got {values['alignment_steps']}")
    for name in ("minutes", "steps", "corpus_size", "eval_per_task", "batch_size", "checkpoint_every",
                 "learning_rate"):
        value = values.get(name, getattr(args, name, None))
        if value is not None and value <= 0:
            raise common.UserError(f"--{name} must be positive, got {value}")
    languages = tuple(l.strip() for l in args.languages.split(",") if l.strip())
    from slm_jax.data.corpus import grammar

    unknown = sorted(set(languages) - set(grammar.LANGUAGES))
    if unknown or "en" not in languages:
        raise common.UserError(f"--languages must include en and only use {', '.join(grammar.LANGUAGES)}; "
                               f"got {args.languages!r}")
    if args.open_asr < 0:
        raise common.UserError(f"--open_asr must be 0 or more, got {args.open_asr}")
    import os

    missing = [path for path in args.wav if not os.path.isfile(path)]
    if missing:
        raise common.UserError(f"--wav: no such file: {', '.join(missing)}")
    if args.no_release:
        values["release"] = ""
    if args.no_real_speech:
        values["real_speech"] = ""
    settings = DemoSettings(out_dir=args.out_dir, open_asr=args.open_asr, languages=languages, synthesizer=args.synthesizer,
                            batch_size=args.batch_size, learning_rate=args.learning_rate, resume=args.resume,
                            wavs=tuple(args.wav), **values)
    if args.gin_file:
        settings = dataclasses.replace(settings, gin_files=tuple(args.gin_file))
    return settings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        rest, overrides = common.split_gin_overrides(argv)
        args = build_parser().parse_args(rest)
        settings = settings_from_args(args)
        settings = dataclasses.replace(settings, gin_bindings=tuple(args.gin_bindings + overrides))
        common.setup_logging()
        from slm_jax.apps import demo

        demo.run_demo(settings)
        return 0

    return common.run_main("slm-demo", run)


if __name__ == "__main__":
    sys.exit(main())
