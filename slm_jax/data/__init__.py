"""The data layer: synthetic multilingual corpus, vocabulary, SeqIO preprocessing and batches.

Modules (imported on demand; only ``errors`` is light, the others pull in TensorFlow/SeqIO):
  grammar            the seeded four-language grammar the corpus speaks
  corpus             corpus generation (espeak-ng), TFRecord shards, manifest, shard checks
  vocab              SentencePiece vocabulary trained on the corpus text
  preprocessors      SeqIO preprocessors: decode PCM, log-mel, prompt and target tokens
  feature_converter  SpeechFeatureConverter: task features -> the model's padded batch
  seqio_data         SeqioData, the gin-configurable training DataSource over a task or mixture
The SeqIO tasks and mixtures themselves are registered in ``tasks/`` (``slm_jax.tasks``).
"""

from slm_jax.data.errors import CorruptShardError, DataError, DataNotPreparedError

__all__ = ["CorruptShardError", "DataError", "DataNotPreparedError"]
