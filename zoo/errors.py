"""One error type for bad configuration: it names the offending field and what was expected."""


class ConfigError(ValueError):
    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")
