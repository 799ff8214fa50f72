"""The data layer: synthetic multilingual corpus, vocabulary, SeqIO feature converter, batches.

Modules (imported on demand; only ``errors`` is light, the others pull in TensorFlow/SeqIO):
  grammar            the seeded four-language grammar the corpus speaks
  corpus             corpus generation (espeak-ng), TFRecord shards, manifest, shard checks
  vocab              SentencePiece vocabulary trained on the corpus text
  feature_converter  PromptFormat and the SeqIO FeatureConverter to the model's batch layout
  pipeline           make_batch_iterator: numpy batches for training and evaluation
"""

from slm_jax.data.errors import CorruptShardError, DataError, DataNotPreparedError

__all__ = ["CorruptShardError", "DataError", "DataNotPreparedError"]
