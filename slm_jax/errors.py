"""Errors that mean 'what was asked for is wrong', as opposed to 'the program is broken'.

The command-line tools report these as one line (``prog: error: ...``, exit status 2) without a
traceback (slm_jax/cli/common.py). Library code raises them too, so this module sits below both.
"""


class UserError(Exception):
    """An error in what the user asked for: a setting, a flag, a file name."""
