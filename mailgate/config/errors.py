"""The one error the configuration loader raises."""

from __future__ import annotations


class ConfigError(Exception):
    """Everything wrong with a configuration file, one ``file: key: problem`` line each.

    The loader collects every problem it can find before raising, so an operator
    fixes a file in one pass instead of one error per start-up attempt.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(self.errors)
