"""Errors of the data layer. ``slm_jax.cli.common`` reports them as one line, without a traceback."""


class DataError(ValueError):
    """Data that cannot be used as asked: the message names the file, task or example."""


class DataNotPreparedError(DataError):
    """A registered task whose data is not on this machine; the message says how to prepare it."""


class CorruptShardError(DataError):
    """A TFRecord shard that is truncated or corrupt; the message names the file (and record)."""
