"""WER of the packaged Whisper-base run whole (its own decoder, through `transformers`) on a TSV of
recordings: the reference point for the SLM's transcripts of the same files.

  .venv/bin/python scripts/whisper_reference_wer.py release/real_speech/transcripts.tsv

The TSV has 'path<TAB>transcript' lines (paths relative to it), as `slm-eval --audio_tsv` reads.
Prints one line per file and the corpus WER (the same normalisation as slm-eval).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tsv", help="'path<TAB>transcript' lines")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import transformers

    from slm_jax import assets, audio, metrics
    from slm_jax.convert import ctranslate2

    files = assets.whisper_base_files()
    state, config = ctranslate2.load_whisper_hf(files.model_bin, files.config_json)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**config)).eval()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=False)
    tokenizer = transformers.WhisperTokenizerFast(tokenizer_file=str(files.tokenizer_json))
    features_of = transformers.WhisperFeatureExtractor(feature_size=config["num_mel_bins"])

    # Plain greedy decoding from Whisper's English-transcription prompt (the packaged generation
    # config predates transformers' language/task arguments).
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
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

    base = os.path.dirname(os.path.abspath(args.tsv))
    references, hypotheses = [], []
    with open(args.tsv, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip() and not line.startswith("#")]
    for path, reference in rows:
        samples = audio.load_audio(os.path.join(base, path))
        features = features_of(samples, sampling_rate=audio.SAMPLE_RATE, return_tensors="pt").input_features
        hypothesis = tokenizer.decode(greedy(features), skip_special_tokens=True).strip()
        references.append(reference)
        hypotheses.append(hypothesis)
        print(f"{path}\t{hypothesis}\t(WER {metrics.word_error_rate([reference], [hypothesis]):.3f})", flush=True)
    print(f"Whisper-base (whole, transformers) WER over {len(rows)} files: "
          f"{metrics.word_error_rate(references, hypotheses):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
