"""Probe, not a library feature: slm-eval with a logit bonus on Whisper's own words.

For a transcriber front end (gin/whisper_base_transcriber_smollm2.gin), greedy decoding adds
BETA to the LLM's logit of every SmolLM2 token of Whisper's transcript. Those tokens are read
from the front end's id channels. Why: the shipped adapter drops and rewords words Whisper had
right (release/README.md, "Where the held-out English errors come from"); this measures how much
a copy prior at decoding gives back. It patches the decoding step for this process only.

  BETA=2 .venv/bin/python scripts/transcript_bias_probe.py --gin_file=gin/whisper_base_transcriber_smollm2.gin \\
      --gin.CORPUS_DIR="'runs/kk/corpus'" --checkpoint=release/whisper_base_transcriber_smollm2 \\
      --stop_on_repeated_ngram=4 --tasks=asr_en,asr_en_open --out=runs/bias2.json

Every other argument is slm-eval's.
"""

import os
import sys

import jax
import jax.numpy as jnp

from slm_jax import decoding, inference
from slm_jax.cli import evaluate
from slm_jax.models.slm import SLM, llm_token_ids

_unpatched_generate = inference.SpeechLanguageModel._generate.__wrapped__


def _generate_with_transcript_bias(self, params, batch, start_tokens, *, max_new_tokens, num_beams,
                                   no_repeat_ngram_size=0, stop_on_repeated_ngram=0):
    beta = float(os.environ["BETA"])
    hidden = batch.get("speech_hidden")
    if hidden is None:  # recordings (--audio_tsv): the front end runs here
        hidden, _ = self.slm.apply({"params": params}, batch["audio_features"], batch["audio_mask"],
                                   method=SLM.encode_speech)
    ids = llm_token_ids(hidden, self.slm.speech_encoder.config.llm_token_channels).reshape(hidden.shape[0], -1)
    # [B, V]: BETA on each row's transcript tokens, made once per batch rather than at every step.
    bonus = jnp.zeros((ids.shape[0], self.llm.config.vocab_size), jnp.float32).at[
        jnp.arange(ids.shape[0])[:, None], jnp.maximum(ids - 1, 0)].max(jnp.where(ids > 0, beta, 0.0))
    make_step_fn, generate = decoding.make_step_fn, decoding.generate

    def biased_step_fn(model, llm_params):
        step = make_step_fn(model, llm_params)

        def biased(tokens, state, step_index):
            logits, state = step(tokens, state, step_index)
            return logits + bonus.astype(logits.dtype), state

        return biased

    decoding.make_step_fn = biased_step_fn
    decoding.generate = generate.__wrapped__  # traced inline: a cached trace would keep old ids
    try:
        return _unpatched_generate(self, params, batch, start_tokens, max_new_tokens=max_new_tokens,
                                   num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
                                   stop_on_repeated_ngram=stop_on_repeated_ngram)
    finally:
        decoding.make_step_fn, decoding.generate = make_step_fn, generate


if __name__ == "__main__":
    if "BETA" not in os.environ:
        sys.exit("transcript_bias_probe: set BETA, the logit bonus (e.g. BETA=2)")
    inference.SpeechLanguageModel._generate = jax.jit(
        _generate_with_transcript_bias, static_argnums=(0,),
        static_argnames=("max_new_tokens", "num_beams", "no_repeat_ngram_size", "stop_on_repeated_ngram"))
    sys.exit(evaluate.main(sys.argv[1:]))
