"""Weight formats, registered by name: what a quantized weight is, independent of how it was computed.

Each format is one module declaring a :class:`~hfquant.formats.base.WeightFormat` subclass; its
``names`` register it (``int4``, ``nf4``, ``fp8``, ...). Build one from a name with
:func:`make_format`, from a saved dict with :func:`format_from_dict`, from a spec string such as
``"int4-g128-sym"`` with :func:`parse_spec`. Adding a format is a new module and an import below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hfquant.formats.base import FORMAT_NAMES, QuantizedWeight, TensorSpec, WeightFormat

FORMAT_FIELD = "format"


def format_names() -> list[str]:
    return list(FORMAT_NAMES)


def make_format(name: Any, **fields: Any) -> WeightFormat:
    """The format registered as ``name``, with ``fields`` (others at the name's defaults)."""
    if not isinstance(name, str) or name not in FORMAT_NAMES:
        raise ValueError(f"format={name!r} is not allowed; expected one of {format_names()}")
    entry = FORMAT_NAMES[name]
    allowed = {f.name for f in dataclasses.fields(entry.cls) if f.name not in entry.fixed}
    if not entry.cls.grouped:
        allowed.discard("group_size")
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"format {name!r} does not take {unknown}; its fields are {sorted(allowed) or 'none'}")
    return entry.cls(**{**entry.defaults, **fields, **entry.fixed})


def format_from_dict(data: Any) -> WeightFormat:
    """Inverse of :meth:`WeightFormat.to_dict`: ``{"format": name, **fields}``."""
    if not isinstance(data, dict) or FORMAT_FIELD not in data:
        raise ValueError(f"a format must be a dict with a {FORMAT_FIELD!r} key, got {data!r}")
    fields = dict(data)
    return make_format(fields.pop(FORMAT_FIELD), **fields)


def parse_spec(spec: str) -> WeightFormat:
    """A spec string -> format: a registered name, then ``-``-separated words.

    ``g<N>`` sets ``group_size`` (``gc`` = per channel), other words are the format's own
    (``sym``/``asym`` for integers, see each format's ``spec_tokens``). ``WeightFormat.name`` is a
    spec that gives the same format back.
    """
    name = max((n for n in FORMAT_NAMES if spec == n or spec.startswith(n + "-")), key=len, default=None)
    if name is None:
        raise ValueError(f"format spec {spec!r} is not understood; expected a format name ({format_names()}) "
                         "followed by optional words such as -g128, -gc (per channel), -sym, -asym")
    cls = FORMAT_NAMES[name].cls
    fields: dict[str, Any] = {}
    for word in filter(None, spec[len(name):].split("-")):
        if cls.grouped and word[0] == "g" and (word == "gc" or word[1:].isdigit()):
            fields["group_size"] = -1 if word == "gc" else int(word[1:])
        elif word in cls.spec_tokens:
            fields.update(cls.spec_tokens[word])
        else:
            allowed = (["g<N>", "gc"] if cls.grouped else []) + list(cls.spec_tokens)
            raise ValueError(f"format spec {spec!r}: {word!r} is not a word of format {name!r}; "
                             f"allowed: {allowed or 'none'}")
    return make_format(name, **fields)


from hfquant.formats import affine, binary, codebook, floatcast, fp8, ternary  # noqa: E402,F401  (registers the built-in formats)

__all__ = ["QuantizedWeight", "TensorSpec", "WeightFormat", "format_from_dict", "format_names", "make_format",
           "parse_spec"]
