"""The one exception family for problems a user can fix.

The CLI prints such an error as a single line (what, where, what to do) and exits
with status 2; anything else is a bug and keeps its traceback.
"""


class CUNetError(Exception):
    """A user-facing error: bad input, bad configuration, missing dependency."""


class ConfigError(CUNetError):
    """A model configuration that CU-Net cannot have (e.g. order >= number of U-Nets)."""


class CheckpointError(CUNetError):
    """A checkpoint that cannot be read or does not fit the model."""
