"""The one error type every checkpoint converter raises."""


class ConversionError(ValueError):
    """A checkpoint does not match the architecture or config it is converted to.

    Raised for a missing tensor, a tensor whose shape disagrees with the config, a tensor the
    architecture has no place for, or a config.json of an architecture no converter handles.
    The message names the tensor (or config field) and the shapes involved.
    """
