"""WER of the packaged Whisper-base run whole (its own decoder, through `transformers`) on a TSV of
recordings: the reference point for the SLM's transcripts of the same files.

  .venv/bin/python scripts/whisper_reference_wer.py release/real_speech/transcripts.tsv

The TSV has 'path<TAB>transcript' lines (paths relative to it), as `slm-eval --audio_tsv` reads.
Prints one line per file and the corpus WER (the same normalisation as slm-eval).

On a generated corpus instead (its test split by default), with a report in slm-eval's shape
that scripts/wer_by_voice.py breaks down by voice:

  .venv/bin/python scripts/whisper_reference_wer.py --corpus_dir=runs/kk/corpus \
      --tasks=asr_en,asr_en_open --out=runs/whisper_alone.json

With --front_end --speeds=1.0,0.9,...: the transcript the speeds config
(gin/cascade/whisper_base_transcriber_speeds_smollm2.gin) hands the adapter, the most confident of
Whisper's transcripts of the copies played at those speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tsv", nargs="?", help="'path<TAB>transcript' lines")
    parser.add_argument("--corpus_dir", default=None, help="a generated corpus instead of a TSV")
    parser.add_argument("--tasks", default="asr_en", help="with --corpus_dir: comma-separated ASR tasks")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--max_examples_per_task", type=int, default=None)
    parser.add_argument("--out", default=None, help="a JSON report (slm-eval's shape: tasks, predictions)")
    parser.add_argument("--front_end", action="store_true",
                        help="transcribe with this project's Flax WhisperTranscriber at its default settings (1 s "
                             "of silence appended, the repeated-4-gram stop): the transcript the transcriber "
                             "front end hands the adapter, rather than transformers' plain greedy decoding")
    parser.add_argument("--speeds", default="",
                        help="with --front_end: comma-separated speeds (WhisperTranscriberConfig.speeds, e.g. "
                             "1.0,0.9,1.1,0.85,1.15,0.8,1.2,0.75); each utterance keeps the most confident copy")
    args = parser.parse_args(argv)
    try:
        speeds = tuple(float(v) for v in args.speeds.split(",") if v.strip())
    except ValueError:
        parser.error(f"--speeds must be comma-separated numbers, got {args.speeds!r}")
    if speeds and not args.front_end:
        parser.error("--speeds needs --front_end: transformers' decoding hears the speech as it is")
    if (args.tsv is None) == (args.corpus_dir is None):
        parser.error("give a TSV or --corpus_dir (one of them)")

    import numpy as np
    import torch
    import transformers

    from slm_jax.weights import assets
    from slm_jax.data import audio
    from slm_jax.inference import metrics
    from slm_jax.weights.convert import ctranslate2

    files = assets.whisper_base_files()
    state, config = ctranslate2.load_whisper_hf(files.model_bin, files.config_json)
    tokenizer = transformers.WhisperTokenizerFast(tokenizer_file=str(files.tokenizer_json))
    if args.front_end:
        transcribe = _front_end_transcriber(state, config, tokenizer, speeds)
        whisper = "Whisper-base (whole, this project's WhisperTranscriber" + (
            f", the most confident of speeds {','.join(map(str, speeds))})" if speeds else ")")
    else:
        model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**config)).eval()
        model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()},
                              strict=False)
        features_of = transformers.WhisperFeatureExtractor(feature_size=config["num_mel_bins"])
        # Plain greedy decoding from Whisper's English-transcription prompt (the packaged generation
        # config predates transformers' language/task arguments).
        prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                                  "<|notimestamps|>"])
        end = tokenizer.convert_tokens_to_ids("<|endoftext|>")

        def greedy(features, max_new_tokens: int = 96) -> list[int]:
            ids = list(prompt)
            with torch.no_grad():
                encoded = model.model.encoder(features)
                for _ in range(max_new_tokens):
                    logits = model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
                    token = int(logits.argmax())
                    if token == end:
                        break
                    ids.append(token)
            return ids[len(prompt):]

        def transcribe(samples):
            features = features_of(samples, sampling_rate=audio.SAMPLE_RATE, return_tensors="pt").input_features
            return tokenizer.decode(greedy(features), skip_special_tokens=True).strip()

        whisper = "Whisper-base (whole, transformers)"

    # (task, name, reference, samples) per utterance.
    if args.tsv:
        base = os.path.dirname(os.path.abspath(args.tsv))
        with open(args.tsv, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip() and not line.startswith("#")]
        utterances = [("tsv", path, reference, audio.load_audio(os.path.join(base, path))) for path, reference in rows]
    else:
        from slm_jax.data.cached.corpus_data import read_corpus

        tasks = args.tasks.split(",")
        examples = read_corpus(args.corpus_dir, [args.split], tasks)
        utterances = [(t, e["id"], e["text"], e["audio"]) for t in tasks
                      for e in [e for e in examples if e["task"] == t][:args.max_examples_per_task]]
    predictions: dict[str, list[dict]] = {}
    for task, name, reference, samples in utterances:
        hypothesis = transcribe(samples)
        predictions.setdefault(task, []).append({"id": name, "reference": reference, "prediction": hypothesis})
        print(f"{name}\t{hypothesis}\t(WER {metrics.word_error_rate([reference], [hypothesis]):.3f})", flush=True)
    report = {"tasks": {}, "predictions": predictions, "corpus_dir": args.corpus_dir, "split": args.split,
              "decoder": f"{whisper}, greedy"}
    for task, items in predictions.items():
        wer = metrics.word_error_rate([p["reference"] for p in items], [p["prediction"] for p in items])
        report["tasks"][task] = {"examples": len(items), "wer": wer}
        print(f"{whisper} WER over {len(items)} {'files' if args.tsv else task}: {wer:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _front_end_transcriber(state, config, tokenizer, speeds=()):
    """samples -> text, by the transcriber front end's own greedy decoding (jit, bucketed lengths),
    from the Whisper checkpoint ``state`` and its ``config``, at ``speeds`` (WhisperTranscriberConfig)."""
    import dataclasses

    import jax
    import numpy as np

    from slm_jax.data import audio, batching
    from slm_jax.contrib.whisper_cascade import convert as hf_whisper_transcriber
    from slm_jax.contrib.whisper_cascade.front_end import WhisperTranscriber

    cfg = dataclasses.replace(hf_whisper_transcriber.config_from_hf(config), speeds=speeds)
    params = hf_whisper_transcriber.params_from_state_dict(state, cfg)
    # The weights are an argument, not a closed-over constant that XLA would fold into the program.
    run = jax.jit(lambda p, f, m: WhisperTranscriber(cfg).apply({"params": p}, f, m,
                                                                method=WhisperTranscriber.transcribe))

    def transcribe(samples):
        features = audio.log_mel_spectrogram(samples)
        frames = features.shape[0]
        # Room for the appended silence; lengths in 2-second buckets, so few shapes compile.
        length = batching.bucket_length(frames, 200, cfg.encoder.max_frames - cfg.trailing_silence_frames)
        if frames > length:
            raise SystemExit(f"an utterance of {frames / 100:.1f} s is longer than Whisper's window")
        out = run(params, *batching.pad_frames([features], length))
        kept = int(out.mask[0].sum())
        return tokenizer.decode(np.asarray(out.tokens[0, :kept]), skip_special_tokens=True).strip()

    return transcribe


if __name__ == "__main__":
    sys.exit(main())
