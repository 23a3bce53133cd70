"""One error type for everything a user can get wrong in a config or on disk.

Messages are one paragraph: what is wrong, what was given, and how to fix it. `train.main` prints them
without a traceback, so they must stand on their own.
"""


class ConfigError(ValueError):
    """A user-facing mistake (bad name, missing file, mismatched checkpoint) with the fix in its text."""
