"""The one error type users see: a one-line message naming the file, field or value at fault."""


class PigeonError(Exception):
    """A user-facing failure. The CLI prints ``pigeon: <message>`` on one line and exits non-zero."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class DataError(PigeonError):
    """Bad or missing input data (raw dataset, users, windows)."""


class ConfigError(PigeonError):
    """A params file or override that does not validate."""


class CheckpointError(PigeonError):
    """A checkpoint that is missing, truncated, foreign or not safetensors."""


class LockError(PigeonError):
    """Another writer holds the workspace."""

    exit_code = 3
