"""The data layer (modules imported on demand; only ``errors`` is light):
  corpus/      the generated corpus (builder: synthesis, shards, manifest; grammar; voices; its
               SentencePiece vocabulary) and imported recordings (recorded)
  seqio/       SeqIO preprocessors, the feature converter and SeqioData, the DataSource over a task
               or mixture
  cached/      the frozen front end's cache and CachedCorpusData, which trains on it
  vocabularies, audio, batching, prompting, synthetic: spec-string vocabularies, log-mel features,
               padding and bucketing, prompt layouts, random batches
The SeqIO tasks and mixtures, the one source of examples and rates, are registered in ``tasks/``
(``slm_jax.tasks``).
"""

from slm_jax.data.errors import CorruptShardError, DataError, DataNotPreparedError

__all__ = ["CorruptShardError", "DataError", "DataNotPreparedError"]
