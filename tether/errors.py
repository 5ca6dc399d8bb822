"""User-facing errors: the CLI prints these as one message, without a traceback."""


class TetherError(Exception):
    """A mistake the user can fix (bad config key, malformed data row, missing file)."""


class ConfigError(TetherError):
    """A bad config file, key or value."""


class RewardError(TetherError):
    """A reward function failed, or returned something other than one finite number per
    completion; the message names the function."""


class DataError(TetherError):
    """A malformed data file or row; the message names the file, the row and the field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.source, self.row, self.field = source, row, field


class Interrupted(TetherError):
    """Ctrl-C stopped a training loop after it checkpointed its step (the CLI exits 130); the
    message names the checkpoint."""
