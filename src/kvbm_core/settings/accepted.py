"""What a setting accepts, in words, for error messages: read from the pydantic field itself.

Every :class:`~kvbm_core.errors.ConfigError` about a bad value lists the accepted values; deriving
them from the model's annotations and bounds keeps the message true when a field changes.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

BOOLEAN_WORDS = "true/false, 1/0, yes/no, on/off"


def accepted_for_field(field: FieldInfo) -> str | None:
    """The accepted values of one field, e.g. ``a whole number from 1 to 65535``."""
    return _describe(field.annotation, field.metadata)


def accepted_at(model: type[BaseModel], loc: Sequence[Any], error_type: str = "") -> str | None:
    """The accepted values at a pydantic error location ``loc`` inside ``model``.

    For an unknown key (``extra_forbidden``) the answer is the keys the enclosing model allows.
    """
    current: Any = model
    field: FieldInfo | None = None
    for i, part in enumerate(loc):
        if isinstance(current, type) and issubclass(current, BaseModel):
            if error_type == "extra_forbidden" and i == len(loc) - 1:
                return ", ".join(current.model_fields)
            if not isinstance(part, str) or part not in current.model_fields:
                return None
            field = current.model_fields[part]
            current = _strip_optional(field.annotation)
        elif isinstance(part, int) or typing.get_origin(current) in (list, dict):
            args = typing.get_args(current)
            current = _strip_optional(args[-1]) if args else Any
            field = None
        else:
            return None
    if field is not None and current is _strip_optional(field.annotation):
        return accepted_for_field(field)
    return _describe(current, [])


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _describe(annotation: Any, metadata: Sequence[Any]) -> str | None:
    annotation = _strip_optional(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return BOOLEAN_WORDS
    if origin is Literal:
        return ", ".join(str(a) for a in typing.get_args(annotation))
    if annotation in (int, float):
        noun = "a whole number" if annotation is int else "a finite number"
        return noun + _bounds(metadata)
    if annotation is str:
        return "a string"
    if origin is list:
        return "a list of strings" if typing.get_args(annotation) == (str,) else "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping with keys " + ", ".join(annotation.model_fields)
    return None


def _bounds(metadata: Sequence[Any]) -> str:
    low = high = None
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            low = f">= {m.ge:g}"
        elif isinstance(m, annotated_types.Gt):
            low = f"> {m.gt:g}"
        elif isinstance(m, annotated_types.Le):
            high = m.le
        elif isinstance(m, annotated_types.Lt):
            high = m.lt
    if low and high is not None and low.startswith(">="):
        return f" from {low[3:]} to {high:g}"
    parts = [p for p in (low, f"<= {high:g}" if high is not None else None) if p]
    return " " + " and ".join(parts) if parts else ""
