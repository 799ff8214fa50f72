"""slm-eval: score a trained SLM on a corpus split: WER (ASR), BLEU (AST), accuracy (instructions)."""

from __future__ import annotations

import difflib
import json
import os
import sys

from slm_jax.cli import common

DESCRIPTION = """\
Evaluate a trained adapter on the tasks of a generated corpus and write a JSON report with
per-task metrics and every prediction: WER for ASR (asr_*, biasing), BLEU for speech translation
(ast_*), exact-match accuracy for instruction and zero-shot tasks.

With --audio_tsv, score your own recordings instead: a TSV of "path<TAB>transcript" lines (paths
relative to the TSV's folder), each transcribed with --instruction and scored by WER.

With --cache_front_end, the frozen front end's outputs for the corpus's examples are kept in
CORPUS/encoder_cache/<front end fingerprint>-eval and read back by later runs with the same front
end: a second evaluation (another --transcript_bias, another adapter) computes only the answers.
A batch the cache does not hold whole runs the front end as without it. Answers match the run
without the cache (the same rows, padded to the same width).

With --decoder=ctc, the LLM is not run: each utterance is transcribed by the adapter's own CTC
head (its best path over the alignment sub-vocabulary; adapters trained with alignment steps
only). A diagnostic of how well the speech is aligned with the LLM's token embeddings; score ASR
tasks with it.

examples:
  slm-eval --gin_file=gin/runs/whisper_base_smollm2.gin --checkpoint=runs/default --out=report.json
  slm-eval --gin_file=gin/runs/whisper_base_smollm2.gin --checkpoint=release/whisper_base_smollm2 \\
      --audio_tsv=release/real_speech/transcripts.tsv --out=real_speech.json
  slm-eval --gin_file=gin/runs/whisper_base_smollm2.gin --checkpoint=runs/default --decoder=ctc \\
      --audio_tsv=release/real_speech/transcripts.tsv --out=real_speech_ctc.json
  slm-eval --gin_file=gin/runs/tiny.gin --checkpoint=runs/tiny --tasks=asr_en,ast_en_fr --split=validation
"""


TSV_TASK = "asr_audio_tsv"  # an asr_* name: scored by WER


def _tsv_examples(tsv: str, instruction: str, max_seconds: float | None = None, why: str = "") -> list[dict]:
    """Examples from 'path<TAB>transcript' lines; '#' comments and blank lines are skipped. Every
    listed file's length is checked from its header (against ``max_seconds``) before any is read."""
    from slm_jax.data import audio

    if not os.path.isfile(tsv):
        raise common.UserError(f"--audio_tsv {tsv}: no such file")
    base = os.path.dirname(os.path.abspath(tsv))
    rows = []
    with open(tsv, "rb") as f:
        raw_lines = f.read().splitlines()
    for number, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise common.UserError(f"{tsv}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                   f"{e.start + 1}); save the file as UTF-8") from None
        line = line.rstrip("\r")
        if not line.strip() or line.startswith("#"):
            continue
        path, tab, transcript = line.partition("\t")
        if not tab or not transcript.strip():
            raise common.UserError(f"{tsv}:{number}: expected 'path<TAB>transcript', got {line!r}")
        rows.append((path, transcript.strip()))
    if not rows:
        raise common.UserError(f"{tsv} lists no recordings")
    for path, _ in rows:
        common.check_audio_file(os.path.join(base, path), max_seconds, why, prog="slm-eval")
    return [{"id": path, "task": TSV_TASK, "instruction": instruction, "target": transcript,
             "audio": audio.load_audio(os.path.join(base, path), max_seconds=max_seconds)}
            for path, transcript in rows]


def _corpus_examples(args, data) -> tuple[list[dict], dict]:
    """The chosen split and tasks of a generated corpus (default: the gin config's)."""
    from slm_jax.data.cached.corpus_data import read_corpus
    from slm_jax.data.corpus import builder as corpus

    corpus_dir = args.corpus_dir or getattr(data, "corpus_dir", None)
    if not corpus_dir:
        raise common.UserError("the gin config names no corpus; pass --corpus_dir")
    manifest = corpus.load_manifest(corpus_dir)
    known = sorted(manifest["tasks"])
    tasks = known if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
            raise common.UserError(f"unknown task {t!r} in {corpus_dir}{hint}")
    examples = read_corpus(corpus_dir, [args.split], tasks, include_zero_shot=True)
    if args.max_examples_per_task:
        counts: dict[str, int] = {}
        kept = []
        for ex in examples:
            counts[ex["task"]] = counts.get(ex["task"], 0) + 1
            if counts[ex["task"]] <= args.max_examples_per_task:
                kept.append(ex)
        examples = kept
    if not examples:
        raise common.UserError(f"no {args.split} examples for tasks {tasks} in {corpus_dir}")
    return examples, {"corpus_dir": os.path.abspath(corpus_dir)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        rest, overrides = common.split_gin_overrides(argv)
        parser = common.gin_argument_parser("slm-eval", DESCRIPTION)
        parser.add_argument("--checkpoint", required=True, help="a model directory (latest step) or a step directory")
        parser.add_argument("--out", required=True, help="the JSON report to write")
        parser.add_argument("--corpus_dir", default=None, help="default: the corpus of the gin config's data")
        parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
        parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
        parser.add_argument("--max_examples_per_task", type=int, default=None)
        parser.add_argument("--batch_size", type=int, default=8)
        parser.add_argument("--decoder", choices=["llm", "ctc"], default="llm",
                            help="llm: the model's answer (default); ctc: the adapter's CTC transcript, "
                                 "no LLM (adapters trained with alignment steps)")
        common.add_decoding_arguments(parser, max_new_tokens=64)
        parser.add_argument("--audio_tsv", default=None,
                            help="score these recordings (lines 'path<TAB>transcript') instead of a corpus split")
        parser.add_argument("--cache_front_end", action="store_true",
                            help="keep the frozen front end's outputs for a corpus's examples on disk "
                                 "(CORPUS/encoder_cache/<fingerprint>-eval) and reuse them in later runs")
        parser.add_argument("--instruction", default="Transcribe the speech.",
                            help="the prompt for --audio_tsv recordings (default: %(default)s)")
        args = parser.parse_args(rest)
        if not args.gin_file:
            raise common.UserError("give the --gin_file the model was trained with")
        if args.cache_front_end and (args.audio_tsv or args.decoder == "ctc"):
            raise common.UserError("--cache_front_end keeps the front end's outputs for a corpus's examples for the "
                                   "LLM's answers; not with --audio_tsv or --decoder=ctc")
        common.check_decoding_arguments(args)
        if args.batch_size < 1:
            raise common.UserError(f"--batch_size must be >= 1, got {args.batch_size}")
        if args.max_examples_per_task is not None and args.max_examples_per_task < 1:
            raise common.UserError(f"--max_examples_per_task must be >= 1, got {args.max_examples_per_task} "
                                   "(leave it out for every example)")
        common.check_utf8("--instruction", args.instruction)
        common.check_utf8("--audio_tsv", args.audio_tsv)
        common.check_utf8("--out", args.out)
        common.check_output_path("--out", args.out)
        common.setup_logging(args.verbose)
        common.parse_gin(args.gin_file, args.gin_bindings + overrides)
        import gin

        from slm_jax.data import audio

        data = gin.query_parameter("train.data").scoped_configurable_fn()
        model = gin.query_parameter("train.model").scoped_configurable_fn()
        if args.audio_tsv:
            max_seconds, why = common.max_audio_seconds(model, data)
            examples = _tsv_examples(args.audio_tsv, args.instruction, max_seconds, why)
            source = {"audio_tsv": args.audio_tsv}
        else:
            examples, source = _corpus_examples(args, data)
        for ex in examples:
            if "features" not in ex:
                ex["features"] = audio.log_mel_spectrogram(ex["audio"])
        common.check_transcript_bias(args, model)
        common.check_checkpoint_matches_model(args.checkpoint, model)
        common.check_output_file("--out", args.out)  # a real write (full disk), before the evaluation
        common.start_backend_quietly(tensorflow=common.data_needs_tensorflow())
        from slm_jax.inference import evaluation, model as inference

        slm, step = inference.load_trained(args.checkpoint, model, data)
        if args.decoder == "ctc" and slm.alignment_vocabulary is None:
            raise common.UserError(f"--decoder=ctc: checkpoint {args.checkpoint} records no alignment vocabulary "
                                   "(trained without a CTC alignment phase in train.phases, or before checkpoints kept it)")

        memo = None
        if args.cache_front_end:
            from slm_jax.data.cached.corpus_data import front_end_fingerprint
            from slm_jax.data.cached.encoder_cache import FrontEndMemo

            fingerprint = front_end_fingerprint(model)
            memo = FrontEndMemo(os.path.join(source["corpus_dir"], "encoder_cache", f"{fingerprint}-eval"),
                                fingerprint)

        def answer(batch):
            features = [e["features"] for e in batch]
            if args.decoder == "ctc":
                return slm.transcribe_ctc(features)
            speech, width = features, None
            if memo is not None:
                speech, width = memo.rows([e["id"] for e in batch], lambda: slm.front_end(features),
                                          lambda: slm.front_end_width(features))
            return slm.generate(speech, [e["instruction"] for e in batch],
                                max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                no_repeat_ngram_size=args.no_repeat_ngram_size,
                                stop_on_repeated_ngram=args.stop_on_repeated_ngram,
                                transcript_bias=args.transcript_bias, precomputed_speech=memo is not None,
                                speech_width=width)

        try:
            report = evaluation.evaluate(examples, answer, batch_size=args.batch_size)
        finally:  # what was computed is kept, even when the run is stopped
            if memo is not None:
                try:
                    memo.save()
                    print(f"front-end cache {memo.directory}: {memo.hits} examples read, {memo.misses} computed")
                except OSError as e:  # a cache that cannot be written must not cost the report
                    print(f"slm-eval: warning: the front end's outputs were not kept in {memo.directory}: {e}",
                          file=sys.stderr)
        from slm_jax.training import paths

        report.update({"checkpoint": paths.absolute(args.checkpoint), "step": step, "split": args.split,
                       **source, "num_beams": args.num_beams, "decoder": args.decoder,
                       "no_repeat_ngram_size": args.no_repeat_ngram_size,
                       "stop_on_repeated_ngram": args.stop_on_repeated_ngram,
                       "transcript_bias": args.transcript_bias})
        try:
            common.write_text_atomically(args.out, json.dumps(report, indent=1, ensure_ascii=False))
        except OSError as e:  # e.g. the disk filled up during the evaluation
            raise common.UserError(f"cannot write --out {args.out}: {e.strerror or e}") from None
        for task, scores in report["tasks"].items():
            metric, value = evaluation.headline(scores)
            print(f"{task:<28} {metric:>8} {value:8.3f}  ({scores['examples']} examples)")
        print(f"report: {args.out}")
        return 0

    return common.run_main("slm-eval", run)


if __name__ == "__main__":
    sys.exit(main())
