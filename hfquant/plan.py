"""Which layers get quantized: module-name rules, kept apart from the module surgery."""

from __future__ import annotations

import re
from collections.abc import Iterable

REGEX_PREFIX = "re:"


def name_matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` is selected by ``pattern``.

    A plain pattern selects a module when its dotted parts occur as a contiguous run of the name's
    parts: ``"lm_head"``, ``"mlp.down_proj"`` (in every layer), ``"model.layers.0"`` (that layer and
    everything below it). ``"re:<regex>"`` must match the whole name. No substring matching:
    ``"proj"`` does not select ``"q_proj"``.
    """
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
    parts, wanted = name.split("."), pattern.split(".")
    return any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


def is_skipped(name: str, patterns: Iterable[str]) -> bool:
    """Whether any pattern keeps module ``name`` in full precision."""
    return any(name_matches(name, p) for p in patterns)
