"""Layer maps: which teacher ``hidden_states`` entry each student entry is aligned with (FLEXKD.md, notation).

Parsed without the models (config validation), resolved against both models' depths by the run plan.
"""

from __future__ import annotations

from typing import Any

from flexkd.dotted import ConfigError


def parse_layer_map(spec: Any) -> str | int | list[tuple[int, int]]:
    """Parse a layer map into 'last', an int K (uniform) or explicit (teacher, student) pairs.

    Accepted: 'last'; 'uniform:K'; 'T:S,T:S' (the form a sweep's categorical uses); [[T, S], ...].
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text == "last":
            return "last"
        if text.startswith("uniform:"):
            k = text.split(":", 1)[1]
            if not k.isdigit() or int(k) < 1:
                raise ConfigError(
                    f"feature.layers: {spec!r}: uniform needs a pair count >= 1, e.g. uniform:2"
                )
            return int(k)
        pairs = []
        for part in text.split(","):
            bits = part.strip().split(":")
            try:
                pairs.append((int(bits[0]), int(bits[1])))
            except (ValueError, IndexError):
                raise ConfigError(
                    f"feature.layers: {spec!r} is not 'last', 'uniform:K' or 'T:S,T:S' pairs of integers"
                ) from None
            if len(bits) != 2:
                raise ConfigError(f"feature.layers: {part!r} is not a T:S pair")
        return pairs
    if isinstance(spec, (list, tuple)) and spec:
        pairs = []
        for item in spec:
            if not (
                isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(i, int) for i in item)
            ):
                raise ConfigError(f"feature.layers: {item!r} is not a [teacher, student] pair of integers")
            pairs.append((int(item[0]), int(item[1])))
        return pairs
    raise ConfigError(f"feature.layers: {spec!r} is not 'last', 'uniform:K', 'T:S,...' or a list of pairs")


def resolve_layer_map(spec: Any, teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """Turn a layer map into explicit non-negative (teacher, student) indices into ``hidden_states``.

    ``*_layers`` count transformer blocks, so ``hidden_states`` has ``layers + 1`` entries (0 = embeddings).
    'uniform:K' pairs block outputs at K evenly spaced depths, ending with last-to-last.
    """
    parsed = parse_layer_map(spec)
    if parsed == "last":
        pairs = [(-1, -1)]
    elif isinstance(parsed, int):
        k = parsed
        if k > student_layers:
            raise ConfigError(
                f"feature.layers: uniform:{k} asks for more pairs than the student's {student_layers} layers"
            )
        pairs = [(round(i * teacher_layers / k), round(i * student_layers / k)) for i in range(1, k + 1)]
    else:
        pairs = parsed
    out = []
    for t, s in pairs:
        for who, idx, n in (("teacher", t, teacher_layers), ("student", s, student_layers)):
            if not -(n + 1) <= idx <= n:
                raise ConfigError(
                    f"feature.layers: {who} layer {idx} is out of range; the {who} has hidden_states "
                    f"0..{n} (or -{n + 1}..-1)"
                )
        out.append((t % (teacher_layers + 1), s % (student_layers + 1)))
    return out
