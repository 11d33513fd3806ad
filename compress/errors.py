"""User-facing errors. Each carries one line saying where and what; the CLI prints it and exits 2."""


class CompressError(Exception):
    """Bad input or an unusable environment: the message is the whole story (no traceback)."""

    exit_code = 2


class RecipeError(CompressError):
    """The recipe is malformed, names an unknown key, or breaks a cross-stage rule."""


class ModelError(CompressError):
    """The model cannot be found, read or handled."""


class DataError(CompressError):
    """A data source is missing, unreadable or too small."""


class CheckpointError(CompressError):
    """A checkpoint is missing, truncated, tampered with or cannot hold what was asked."""


class LockError(CompressError):
    """Another run holds the output directory."""


class StageError(CompressError):
    """A stage cannot proceed with the model and settings it was given."""


def brief(err: BaseException, limit: int = 240) -> str:
    """A third-party exception condensed to one line for our messages."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
