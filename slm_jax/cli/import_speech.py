"""slm-import-speech: real recordings -> a corpus in the synthetic corpus's format (and a mix of both)."""

from __future__ import annotations

import argparse
import sys
import time

from slm_jax.cli import common

DESCRIPTION = """\
Turn a collection of real human recordings into a corpus that reads like one of slm-make-corpus:
TFRecord shards per task and split (task asr_en unless --task), 16 kHz mono 16-bit PCM, and a
manifest.json that every corpus reader (SeqIO tasks, CachedCorpusData, slm-mixture, slm-eval)
takes as it is. The manifest also records, for every imported file, its repository, commit,
path, licence and content hash (`sources`), and every file left out with the reason
(`excluded`).

Input: a local folder (--folder) or one commit of a git directory (--git_dir, --commit; e.g. a
bare snapshot of a GitHub repository). How speaker and transcript are found (the source spec):
  --preset=fsdd             Free Spoken Digit Dataset: recordings/{digit}_{speaker}_{n}.wav, the
                            digit read as its word ("7" -> "Seven."), licence CC-BY-SA-4.0
  --preset=speech_commands  Speech Commands: {word}/{speaker}_nohash_{n}.wav, licence CC-BY-4.0
  --path_regex=RE           your own: a regular expression searched in each path, with named
                            groups speaker and label (or text); --label_map=digits|K=V,K=V maps
                            labels to words (default: the label is the transcript)
  --transcripts=TABLE       a TSV/CSV of path -> transcript (optional speaker column), in the
                            collection (paths relative to the table's folder) or on this machine
                            (paths relative to the collection's root)
  --pseudo_labels           files without a transcript are transcribed by Whisper-base (its own
                            encoder and decoder, this project's WhisperTranscriber) and kept only
                            when the transcript passes the filter: mean token log-probability
                            >= --min_confidence, finished, no repeated word --repeat_ngram-gram,
                            compression ratio <= --max_compression_ratio; the manifest marks these
                            labels as pseudo with their confidence
Every file is decoded and resampled to 16 kHz mono. A file whose audio is one of the held-out
evaluation recordings (--heldout_dir, default release/real_speech: same bytes, same samples at
its own or at 16 kHz, or the same loudness envelope at the same length) is left out, as are
duplicates, unreadable files and clips outside --min_seconds..--max_seconds.

Splits are by speaker: whole speakers go to test, then validation, until each holds its share of
the files (--test_share, --validation_share; at least one speaker each), the rest train; or name
them with --test_speakers / --validation_speakers. The corpus is written into a temporary sibling
of --out and renamed into place when complete; an existing --out is refused.

Mixing: --mix_into=SYNTHETIC_CORPUS --share=F --mixed_out=DIR writes one more corpus, the
synthetic one with recorded training examples added to --task's train split so that they are
that share of it (drawn without replacement, repeated when there are too few); every other task
and split is the synthetic corpus's own. Point training at DIR (SeqioData.corpus_dir or
CachedCorpusData.corpus_dir): the data sources read it as any corpus. Without an import
(--recorded=DIR1,DIR2 instead of a source) it mixes corpora imported before.

examples:
  slm-import-speech --git_dir=/path/to/free-spoken-digit-dataset.git --preset=fsdd --out=runs/recorded/fsdd
  slm-import-speech --folder=speech_commands_test_set_v0.02 --preset=speech_commands --out=runs/recorded/sc
  slm-import-speech --folder=my_recordings --transcripts=my_recordings/transcripts.tsv \\
      --path_regex='(?P<speaker>[^/]+)/[^/]+\\.wav$' --licence=CC-BY-4.0 --name=mine --out=runs/recorded/mine
  slm-import-speech --folder=talks --path_regex='(?P<speaker>[^/]+)/' --pseudo_labels \\
      --licence=CC0-1.0 --name=talks --out=runs/recorded/talks
  slm-import-speech --recorded=runs/recorded/fsdd --mix_into=data/corpus --share=0.3 --mixed_out=data/corpus_fsdd30
"""


def _speakers(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm-import-speech", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_argument_group("input (one of)")
    where.add_argument("--folder", help="a local folder of recordings")
    where.add_argument("--git_dir", help="a git directory (bare or not) whose --commit holds the recordings")
    where.add_argument("--recorded", type=common.comma_separated("runs/recorded/fsdd"), default=None,
                       metavar="DIR1,DIR2", help="no import: mix these imported corpora (with --mix_into)")
    where.add_argument("--commit", default="HEAD",
                       help="with --git_dir: the commit to read (default HEAD); with --folder: the commit the folder "
                            "was taken from, recorded for every file")
    where.add_argument("--repo", default=None,
                       help="owner/name recorded as every file's repository (default: from a snapshot path "
                            "'.../owner+name/...'; a local folder: none)")
    spec = parser.add_argument_group("source spec")
    spec.add_argument("--preset", choices=["fsdd", "speech_commands"], default=None,
                      help="a known collection's layout, labels and licence (the other options override it)")
    spec.add_argument("--name", default=None, help="the collection's name: the prefix of example ids")
    spec.add_argument("--under", default=None, help="only files below this folder of the collection")
    spec.add_argument("--path_regex", action="append", default=None, metavar="RE",
                      help="a regular expression searched in each path, with named groups speaker and label or "
                           "text (repeatable: the first that matches)")
    spec.add_argument("--label_map", default=None,
                      help="'digits' (0..9 -> zero..nine), 'K=V,K=V', or 'none' (the label is the transcript)")
    spec.add_argument("--transcripts", default=None, metavar="TABLE",
                      help="a TSV/CSV of path -> transcript [-> speaker]")
    spec.add_argument("--pseudo_labels", action="store_true",
                      help="transcribe files without a transcript with Whisper-base (filtered)")
    spec.add_argument("--licence", default=None, help="the recordings' licence, recorded for every file (SPDX id)")
    spec.add_argument("--licence_file", default=None, help="the file in the collection that states the licence")
    out = parser.add_argument_group("output")
    out.add_argument("--out", help="the corpus directory to write (must not exist)")
    out.add_argument("--task", default="asr_en", help="the task name of every example (default asr_en)")
    out.add_argument("--lang", default="en", help="the language of the speech (default en)")
    out.add_argument("--seed", type=int, default=0, help="draws the speaker order of the splits (default 0)")
    out.add_argument("--test_share", type=float, default=0.1, help="share of files for test (default 0.1)")
    out.add_argument("--validation_share", type=float, default=0.1, help="share for validation (default 0.1)")
    out.add_argument("--test_speakers", type=_speakers, default=[], metavar="S1,S2",
                     help="exactly these speakers in test")
    out.add_argument("--validation_speakers", type=_speakers, default=[], metavar="S1,S2",
                     help="exactly these speakers in validation")
    out.add_argument("--examples_per_shard", type=int, default=500, help="TFRecord shard size (default 500)")
    out.add_argument("--min_seconds", type=float, default=0.1, help="shorter clips are left out (default 0.1)")
    out.add_argument("--max_seconds", type=float, default=30.0, help="longer clips are left out (default 30)")
    out.add_argument("--text_style", choices=["sentence", "as_is"], default="sentence",
                     help="sentence: 'seven' -> 'Seven.', as the synthetic corpus writes (default); as_is")
    out.add_argument("--vocab_size", type=int, default=0,
                     help="train a SentencePiece vocabulary on the training text (0: none, the default: a mix "
                          "carries the synthetic corpus's)")
    out.add_argument("--max_files", type=int, default=None, help="import only the first N labelled files")
    out.add_argument("--heldout_dir", action="append", default=None, metavar="DIR",
                     help="held-out recordings never to import (repeatable; default release/real_speech)")
    pseudo = parser.add_argument_group("pseudo-label filter")
    pseudo.add_argument("--min_confidence", type=float, default=-0.5,
                        help="least mean token log-probability kept (default -0.5)")
    pseudo.add_argument("--max_compression_ratio", type=float, default=2.4, help="default 2.4 (Whisper's)")
    pseudo.add_argument("--repeat_ngram", type=int, default=4,
                        help="drop a label that repeats a word n-gram (default 4; 0: no check)")
    mix = parser.add_argument_group("mixing")
    mix.add_argument("--mix_into", default=None, metavar="SYNTHETIC_CORPUS", help="a synthetic corpus to mix into")
    mix.add_argument("--share", type=float, default=None, help="share of --task's training examples that are recorded")
    mix.add_argument("--mixed_out", default=None, help="the mixed corpus directory to write (must not exist)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        from slm_jax.data.corpus import recorded

        parser = build_parser()
        args = parser.parse_args(argv)
        importing = bool(args.folder or args.git_dir)
        if args.folder and args.git_dir:
            raise common.UserError("give --folder or --git_dir, not both")
        if importing and args.recorded:
            raise common.UserError("--recorded mixes corpora imported before; it does not go with --folder/--git_dir")
        if not importing and not args.recorded:
            raise common.UserError("give the recordings (--folder or --git_dir) or, to mix only, --recorded")
        mixing = [args.mix_into, args.share, args.mixed_out]
        if any(v is not None for v in mixing) and not all(v is not None for v in mixing):
            raise common.UserError("mixing needs all of --mix_into, --share and --mixed_out")
        if args.recorded and args.mix_into is None:
            raise common.UserError("--recorded needs --mix_into, --share and --mixed_out")
        if args.share is not None and not 0.0 < args.share < 1.0:
            raise common.UserError(f"--share must be between 0 and 1 (exclusive), got {args.share}")
        if importing and not args.out:
            raise common.UserError("--out is required with --folder/--git_dir")
        # Refused before any work: an existing directory is never written into.
        if args.out:
            recorded.check_new_directory(args.out, "--out")
        if args.mixed_out:
            recorded.check_new_directory(args.mixed_out, "--mixed_out")
        if args.mix_into:
            from slm_jax.data.corpus import builder

            builder.load_manifest(args.mix_into)
        common.setup_logging()
        start = time.time()
        recorded_dirs = list(args.recorded or [])
        if importing:
            spec = _source_spec(args, recorded)
            options = recorded.ImportOptions(
                task=args.task, lang=args.lang, seed=args.seed, validation_share=args.validation_share,
                test_share=args.test_share,
                fixed_speakers={**{s: "test" for s in args.test_speakers},
                                **{s: "validation" for s in args.validation_speakers}} or None,
                examples_per_shard=args.examples_per_shard, min_seconds=args.min_seconds,
                max_seconds=args.max_seconds, text_style=args.text_style, vocab_size=args.vocab_size,
                heldout_dirs=tuple(args.heldout_dir or [recorded.DEFAULT_HELDOUT_DIR]),
                pseudo_filter=recorded.PseudoLabelFilter(args.min_confidence, args.max_compression_ratio,
                                                         args.repeat_ngram),
                max_files=args.max_files, progress=not args.quiet)
            collection = (recorded.LocalFolder(args.folder, args.repo, None if args.commit == "HEAD" else args.commit)
                          if args.folder else recorded.GitSnapshot(args.git_dir, args.commit, args.repo))
            manifest = recorded.import_collection(collection, spec, args.out, options)
            print("\n".join(recorded.summary_lines(manifest, args.out)))
            print(f"imported in {time.time() - start:.1f} s")
            recorded_dirs.append(args.out)
        if args.mix_into:
            mixed = recorded.mix_corpora(args.mix_into, recorded_dirs, args.mixed_out, args.share, task=args.task,
                                         seed=args.seed, progress=not args.quiet)
            print("\n".join(recorded.summary_lines(mixed, args.mixed_out)[-2:]))
        return 0

    return common.run_main("slm-import-speech", run)


def _source_spec(args, recorded):
    preset = recorded.PRESETS.get(args.preset)
    if preset is None and not (args.path_regex or args.transcripts):
        raise common.UserError("say how speakers and transcripts are found: --preset, --path_regex (with a "
                               "speaker group) or --transcripts")
    if preset is None and not args.name:
        raise common.UserError("--name is required without --preset (it prefixes every example id)")
    if preset is None and not args.licence:
        raise common.UserError("--licence is required without --preset: every imported file records its licence")
    base = preset or recorded.SourceSpec(name=args.name, patterns=tuple(args.path_regex or ()),
                                         transcripts=args.transcripts)
    changes = {"name": args.name, "under": args.under, "transcripts": args.transcripts,
               "licence": args.licence, "licence_file": args.licence_file,
               "patterns": tuple(args.path_regex) if args.path_regex else None,
               "label_map": recorded.parse_label_map(args.label_map) if args.label_map else None}
    if args.label_map == "none":
        changes["label_map"] = None
        base = recorded.dataclasses.replace(base, label_map=None)
    spec = recorded.dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None},
                                        pseudo_labels=args.pseudo_labels or base.pseudo_labels)
    if args.licence_file:  # asked for by name: it must be there
        spec = recorded.dataclasses.replace(spec, licence_file_optional=False)
    return spec


if __name__ == "__main__":
    sys.exit(main())
