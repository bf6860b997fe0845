"""Small parsers shared by the CLI's commands."""

from __future__ import annotations

from facefuse.errors import InvalidInputError


def parse_option(text: str) -> tuple[str, float]:
    """``NAME=NUMBER`` (a fusion strategy option, e.g. ``w=0.5``) -> (name, value)."""
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise InvalidInputError(f"--option {text!r}: expected NAME=NUMBER, e.g. w=0.5") from None
