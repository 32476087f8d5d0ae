"""Which layer gets which scheme: module-name rules resolved once into an explicit per-layer plan.

A :class:`QuantPlan` is a default scheme plus ordered rules ``pattern -> scheme or None``. Resolving
it against a model's linear layers gives a :class:`ResolvedPlan`, ``{layer name: scheme}``, which
is what ``config.json`` stores and what a reload uses as it is (no pattern is matched again).

Precedence, per layer:

1. a layer matched by ``modules_to_not_convert`` (as resolved by the quantizer: the user's list, or
   by default the output embeddings and tied weights, plus the model's keep-in-fp32 modules) stays
   in full precision;
2. otherwise the *first* rule whose pattern matches decides: its scheme, or ``None`` = full precision;
3. otherwise the default scheme; for the ``embedding_layers`` given to :meth:`QuantPlan.resolve`
   (the token embedding; the output head too when ``HfQuantConfig(embeddings=...)`` is set) the
   plan's ``embeddings`` scheme instead (``None`` = full precision).

A rule whose pattern matches no linear layer at all is an error naming the rule, so a typo never
silently leaves a rule unused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hfquant.schemes import LayerScheme, scheme_from_value
from hfquant.validation import REGEX_PREFIX, require_pattern


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


def unmatched(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns that select none of ``names``."""
    names = list(names)
    return [p for p in patterns if not any(name_matches(n, p) for n in names)]


@dataclass(frozen=True)
class ResolvedPlan:
    """The scheme of every quantized layer, by module name; layers not listed stay in full precision."""

    layers: dict[str, LayerScheme]

    def to_dict(self) -> dict[str, Any]:
        """``{"schemes": {scheme name: scheme}, "layers": {layer: scheme name}}`` (compact for config.json)."""
        schemes = {scheme.name: scheme.to_dict() for scheme in self.layers.values()}
        return {"schemes": dict(sorted(schemes.items())),
                "layers": {name: scheme.name for name, scheme in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> ResolvedPlan:
        if not (isinstance(data, dict) and set(data) == {"schemes", "layers"}
                and all(isinstance(data[key], dict) for key in data)):
            raise ValueError(f"plan={data!r} is not allowed; expected {{'schemes': {{...}}, 'layers': {{...}}}}")
        names = [*data["schemes"], *data["layers"], *data["layers"].values()]
        if not all(isinstance(name, str) for name in names):
            raise ValueError(f"plan={data!r} is not allowed; scheme and layer names must be strings")
        schemes = {}
        for key, value in data["schemes"].items():
            try:
                scheme = LayerScheme.from_dict(value)
            except ValueError as error:
                raise ValueError(f"plan: scheme {key!r}: {error}") from None
            if scheme.name != key:
                raise ValueError(f"plan: scheme {key!r} describes {scheme.name!r}; the saved plan is inconsistent")
            schemes[key] = scheme
        missing = sorted({s for s in data["layers"].values() if s not in schemes})
        if missing:
            raise ValueError(f"plan: layers refer to undeclared schemes {missing}")
        return cls({layer: schemes[s] for layer, s in data["layers"].items()})

    def counts(self) -> dict[str, int]:
        """Layers per scheme name."""
        counts: dict[str, int] = {}
        for scheme in self.layers.values():
            counts[scheme.name] = counts.get(scheme.name, 0) + 1
        return counts

    def table(self) -> str:
        """A Markdown table of every quantized layer and its scheme."""
        rows = "\n".join(f"| `{name}` | `{scheme.name}` |" for name, scheme in self.layers.items())
        return f"| layer | scheme |\n|---|---|\n{rows}"


@dataclass(frozen=True)
class QuantPlan:
    """A default scheme and ordered ``(pattern, scheme or None)`` rules; see the module docstring."""

    default: LayerScheme
    rules: tuple[tuple[str, LayerScheme | None], ...] = field(default=())
    embeddings: LayerScheme | None = None  # default of the token embedding and output head; None = full precision

    def resolve(self, layer_names: Iterable[str], skip: Iterable[str] = (),
                embedding_layers: Iterable[str] = ()) -> ResolvedPlan:
        """The scheme of each of ``layer_names`` (in order) that is not skipped and not kept float by a rule.

        ``embedding_layers`` (among ``layer_names``: the token embedding, the output head) default to
        :attr:`embeddings` instead of :attr:`default`.
        """
        names, skip, embedding_layers = list(layer_names), list(skip), set(embedding_layers)
        unused = unmatched([pattern for pattern, _ in self.rules], names)
        if unused:
            raise ValueError(f"rules: pattern(s) {unused} match no linear layer (or token embedding) of this model; allowed: dotted "
                             "module names or 're:<regex>' full matches (e.g. 'mlp.down_proj', 're:.*\\.0\\..*')")
        layers = {}
        for name in names:
            if is_skipped(name, skip):
                continue
            default = self.embeddings if name in embedding_layers else self.default
            scheme = next((s for pattern, s in self.rules if name_matches(name, pattern)), default)
            if scheme is not None:
                layers[name] = scheme
        return ResolvedPlan(layers)

    def rules_dict(self) -> dict[str, Any]:
        """The rules as the config takes them (for saving the request next to the resolved plan)."""
        return {pattern: None if s is None else s.weight.to_dict() for pattern, s in self.rules}


def plan_from_rules(default: LayerScheme, rules: Mapping[str, Any] | None,
                    embeddings: LayerScheme | None = None) -> QuantPlan:
    """A plan from the config's ``rules``: ``{pattern: format name | dict of format fields | None}``."""
    parsed = []
    for pattern, value in (rules or {}).items():
        require_pattern("rules", pattern)
        parsed.append((pattern, None if value is None else scheme_from_value(value, f"rules[{pattern!r}]")))
    return QuantPlan(default, tuple(parsed), embeddings)
