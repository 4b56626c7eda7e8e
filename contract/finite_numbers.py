"""Finite numbers in a config: every float field, found in a validated config or in the raw mapping
before pydantic reads it (a bound like gt=0 would refuse nan without saying why, and let inf through)."""
from __future__ import annotations

import math
import types
import typing
from typing import Any, Iterator, Optional, Union

from pydantic import BaseModel


def is_float_field(annotation: Any) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return float in typing.get_args(annotation)
    return False


def model_of(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model a field holds (`Model` or `Optional[Model]`), else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def float_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted field, value) of every float field set in a validated config, nested sections included."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from float_fields(value, f"{prefix}{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and is_float_field(field.annotation):
            yield f"{prefix}{name}", value


def non_finite(value: Any) -> bool:
    """Whether pydantic would read `value` as an infinite or nan float (inf, .nan, "-Infinity", 1e999, 10**400)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, str)):
        try:
            return not math.isfinite(float(value.strip() if isinstance(value, str) else value))
        except (ValueError, OverflowError):
            return isinstance(value, int)  # an int too large for a float
    return False


def raw_non_finite(model: type[BaseModel], raw: Any, prefix: str = "") -> list[str]:
    """Dotted names of float fields whose raw value is infinite or nan, before pydantic sees them (a
    bound like gt=0 would otherwise refuse nan without saying why, and let inf through)."""
    if not isinstance(raw, dict):
        return []
    out = []
    for name, field in model.model_fields.items():
        if name not in raw:
            continue
        sub = model_of(field.annotation)
        if sub is not None:
            out += raw_non_finite(sub, raw[name], f"{prefix}{name}.")
        elif is_float_field(field.annotation) and non_finite(raw[name]):
            out.append(f"{prefix}{name}")
    return out
