"""The encoder-rows front end's corpus cache (gin/whisper_base_transcriber_encoder_rows_smollm2.gin)
made from a tokens-only transcriber cache of the same corpus and one run of Whisper's encoder,
instead of running Whisper's decoder over the corpus again (slm-train would: about 20 minutes per
2,000 utterances on a 2-core CPU; this takes about 7).

  .venv/bin/python scripts/encoder_rows_cache.py CORPUS TOKENS_CACHE

TOKENS_CACHE is the tokens-only cache's directory name under CORPUS/encoder_cache/ (the fingerprint
of gin/whisper_base_transcriber_smollm2.gin's front end, which slm-train logs).

The old cache's rows (Whisper's transcript, one row per SmolLM2 token, states zeroed) go through
the same ``encoder_rows_before`` as the front end, after the encoder's output computed as the front
end computes it (``WhisperTranscriber.encode``: trailing silence appended). The new cache lands in
CORPUS/encoder_cache/<the new config's fingerprint>, where slm-train looks for it.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus_dir")
    parser.add_argument("tokens_cache", help="fingerprint of the tokens-only cache under CORPUS/encoder_cache/")
    parser.add_argument("--gin_file", default="gin/whisper_base_transcriber_encoder_rows_smollm2.gin")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from slm_jax.data import audio as audio_lib, batching
    from slm_jax.weights import frozen
    from slm_jax.data.cached.corpus_data import front_end_fingerprint, read_corpus
    from slm_jax.cli import common
    from slm_jax.data.cached.encoder_cache import EncoderCache, write_cache
    from slm_jax.contrib.whisper_cascade.front_end import WhisperTranscriber, encoder_rows_before

    common.parse_gin([args.gin_file], [f"CORPUS_DIR={args.corpus_dir!r}"])
    import gin

    model = gin.query_parameter("train.model").scoped_configurable_fn()
    config = model.speech_encoder
    if not getattr(config, "encoder_rows_every", 0) or config.decoder_states:
        print(f"{args.gin_file} does not configure encoder rows over a tokens-only transcript", file=sys.stderr)
        return 2
    if config.encoder_rows_below_confidence is not None:
        print(f"{args.gin_file} gives the encoder's rows only where Whisper was unsure; the tokens-only cache does "
              "not hold Whisper's confidence, so let slm-train build this cache", file=sys.stderr)
        return 2
    old_dir = os.path.join(args.corpus_dir, "encoder_cache", args.tokens_cache)
    old = EncoderCache(old_dir)
    if old.dim != config.output_dim:
        print(f"{old_dir} holds rows of width {old.dim}, not this front end's {config.output_dim}", file=sys.stderr)
        return 2
    fingerprint = front_end_fingerprint(model)
    new_dir = os.path.join(args.corpus_dir, "encoder_cache", fingerprint)

    params = frozen.load_on_host(config, model.speech_encoder_source)
    module = WhisperTranscriber(config)
    # The weights are an argument: closed over, XLA would fold them into the program as constants.
    encode = jax.jit(lambda p, f, m: module.apply({"params": p}, f, m, method=WhisperTranscriber.encode))
    examples = {ex["id"]: ex for split in ("train", "validation", "test")
                for ex in read_corpus(args.corpus_dir, [split]) if ex["id"] in old}

    def encoder_rows():
        for key, ex in tqdm(sorted(examples.items(), key=lambda kv: len(kv[1]["audio"])), desc="encoder rows",
                            unit="utt"):
            features = audio_lib.log_mel_spectrogram(ex["audio"])
            padded, mask = batching.pad_frames(
                [features], batching.bucket_length(features.shape[0], 100, config.encoder.max_frames))
            memory, memory_mask = encode(params, padded, mask)
            text = jnp.asarray(old[key])[None]
            packed, packed_mask = encoder_rows_before(memory, memory_mask, text, jnp.ones(text.shape[:2], jnp.int32),
                                                      config.encoder_rows_every)
            yield key, np.asarray(packed[0, : int(packed_mask.sum())], np.float32)

    write_cache(new_dir, fingerprint, encoder_rows())
    print(f"{len(examples)} examples -> {new_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
