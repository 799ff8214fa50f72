"""End-to-end generation through encoder -> adapter -> LLM, for both LLM families."""

import jax
import numpy as np
import pytest
import seqio

from slm_jax.parallel import partitioning
from slm_jax.weights.frozen import load_frozen_params
from slm_jax.inference.model import SpeechLanguageModel
from slm_jax.data.prompting import CHATML_PROMPT, T5_PROMPT
from slm_jax.data.synthetic import SyntheticData
from slm_jax.training.optimizers import make_optimizer
from slm_jax.training.step import Trainer
from tiny_models import FEATURE_LENGTHS, model_spec

VOCAB = seqio.ByteVocabulary()  # a real vocabulary that needs no training; the LLM table is widened to fit


def _model(llm: str):
    import dataclasses

    spec = model_spec(llm)
    spec = dataclasses.replace(spec, llm=dataclasses.replace(spec.llm, vocab_size=VOCAB.vocab_size + 5))
    trainer = Trainer(spec.build(), make_optimizer()[0], None, partitioning.make_mesh(data=1, devices=jax.devices()[:1]))
    example = SyntheticData(FEATURE_LENGTHS, 128).batch(1, 0)
    frozen = load_frozen_params(trainer, spec, example)
    adapter = trainer.init_state(0, example).adapter_params
    fmt = T5_PROMPT if llm == "t5" else CHATML_PROMPT
    return SpeechLanguageModel(spec, frozen, adapter, VOCAB, fmt, audio_bucket_frames=16)


@pytest.mark.parametrize("llm", ["t5", "llama"])
@pytest.mark.slow
def test_batched_generation_equals_one_at_a_time(llm):
    slm = _model(llm)
    rng = np.random.default_rng(0)
    short, long = rng.normal(size=(20, 80)).astype(np.float32), rng.normal(size=(44, 80)).astype(np.float32)
    instructions = ["Transcribe the speech.", "Translate the speech into French, please."]
    together = slm.generate([short, long], instructions, max_new_tokens=6)
    alone = [slm.generate([short], instructions[:1], max_new_tokens=6)[0],
             slm.generate([long], instructions[1:], max_new_tokens=6)[0]]
    assert together == alone
    assert all(isinstance(t, str) for t in together)
    # Beam search with one beam is greedy search; a wider beam also runs batched.
    assert slm.generate([short], instructions[:1], max_new_tokens=6, num_beams=1) == alone[:1]
    beams = slm.generate([short, long], instructions, max_new_tokens=6, num_beams=3)
    assert len(beams) == 2


def test_mismatched_instruction_count_is_refused():
    slm = _model("t5")
    with pytest.raises(ValueError, match="2 audio inputs but 3 instructions"):
        slm.generate([np.zeros((10, 80), np.float32)] * 2, ["a", "b", "c"])


@pytest.mark.slow
def test_ctc_transcript_is_the_adapters_best_path_and_needs_an_alignment_vocabulary():
    import jax.numpy as jnp

    from slm_jax.models.slm import SLM
    from slm_jax.training import alignment

    plain = _model("llama")
    with pytest.raises(ValueError, match="no alignment vocabulary"):
        plain.transcribe_ctc([np.zeros((10, 80), np.float32)])
    ids = [ord(c) + 3 for c in "abcdefghij "]  # byte-vocabulary ids of these characters
    slm = SpeechLanguageModel(plain.spec, {k: v for k, v in plain.params.items() if k != "adapter"},
                              plain.params["adapter"], VOCAB, CHATML_PROMPT, audio_bucket_frames=16,
                              alignment_token_ids=ids)
    rng = np.random.default_rng(1)
    short, long = rng.normal(size=(20, 80)).astype(np.float32), rng.normal(size=(44, 80)).astype(np.float32)
    together = slm.transcribe_ctc([short, long])
    assert together == [slm.transcribe_ctc([short])[0], slm.transcribe_ctc([long])[0]]
    # The same best path computed directly (the input padded to its bucket, 48 frames, as generate pads).
    padded = np.zeros((1, 48, 80), np.float32)
    padded[0, :44] = long
    rows = slm.slm.apply({"params": slm.params}, jnp.asarray(padded), jnp.arange(48)[None] < 44,
                         method=SLM.encode_speech)
    logits, frame_mask = slm.slm.apply({"params": slm.params}, rows, jnp.asarray(slm.alignment_vocabulary.ids),
                                       method=alignment.adapter_ctc_logits)
    direct = alignment.greedy_decode(np.asarray(logits), np.asarray(frame_mask), slm.alignment_vocabulary)[0]
    assert together[1] == VOCAB.decode(direct).strip()
    assert set(together[1]) <= set("abcdefghij ")
