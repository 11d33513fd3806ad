"""One-line messages for pydantic validation errors: where (``stages[0].quantize.config.bits``),
what is wrong, and what is allowed."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ValidationError


def location(prefix: str, loc: tuple) -> str:
    text = prefix
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text = str(part)
    return text or "recipe"


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last element of ``loc``."""
    current = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        models = _models_in(field.annotation)
        current = models[0] if models else None
    return current


def _expected(ctx: dict) -> str:
    return str(ctx.get("expected", "")).replace(" or ", ", ")


def describe_error(error: dict, model: type[BaseModel] | None) -> str:
    """What is wrong with one pydantic error, in words, without the location."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        owner = _model_at(model, error["loc"][:-1]) if model else None
        allowed = f"; allowed: {', '.join(owner.model_fields)}" if owner else ""
        return f"unknown key {error['loc'][-1]!r}{allowed}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"{value!r} is not one of {_expected(ctx)}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    message = error["msg"][0].lower() + error["msg"][1:]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return f"{message} (got {value!r})"
    return message


def format_validation_error(err: ValidationError, prefix: str = "",
                            model: type[BaseModel] | None = None) -> str:
    """``place: what`` for the first error, with a count of the others."""
    errors = err.errors(include_url=False)
    # a misspelt key usually explains a "missing" one too: report it first
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = first["loc"][:-1] if first["type"] == "extra_forbidden" else first["loc"]  # name the mapping
    text = f"{location(prefix, loc)}: {describe_error(first, model)}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text


__all__ = ["describe_error", "format_validation_error", "location"]
