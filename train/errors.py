"""User-facing errors. The CLI prints their message (what is wrong, where, how to fix it) with no traceback."""


class HalyardError(Exception):
    """An error caused by the user's input (config, data, model path), not by a bug."""


class ConfigError(HalyardError):
    """Problems in the configuration. Holds every problem found, so they are reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        super().__init__(f"invalid configuration ({count}):\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(HalyardError):
    """A data file that cannot be used; the message names the file, the row and the field."""
