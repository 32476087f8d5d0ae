"""Formats the parametrised tests run over: every registered name once, plus its 16-column-group variant."""

from __future__ import annotations

from hfquant.formats import format_names, make_format
from hfquant.formats.base import WeightFormat


def registered_format_variants() -> list[WeightFormat]:
    """Each name's format (aliases once), plus its 16-column-group variant where it has groups."""
    formats: list[WeightFormat] = []
    for name in format_names():
        fmt = make_format(name)
        variants = [fmt, make_format(name, group_size=16)] if fmt.grouped and fmt.group_size != 16 else [fmt]
        formats += [v for v in variants if v not in formats]
    return formats
