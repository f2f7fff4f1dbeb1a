"""Errors that name what is wrong: the config field, or the checkpoint tensor and file."""


class ConfigError(ValueError):
    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: a missing, misshapen or unexpected tensor, a corrupted
    file, an unknown architecture. The message names the tensor (when there is one) and the file."""

    def __init__(self, path, problem: str, tensor: str | None = None):
        self.path, self.tensor = str(path), tensor
        where = f"{path}: tensor {tensor!r}" if tensor else str(path)
        super().__init__(f"{where}: {problem}")
