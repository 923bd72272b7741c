"""Typed `--exp-options key=value` conversion: each value is converted to the attribute's declared type."""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Union

from ..errors import UserError

_TRUE, _FALSE, _NONE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"none", "null"}


def parse_pairs(tokens: list[str] | None) -> dict[str, str]:
    """['a=1', 'b=(2,3)'] -> {'a': '1', 'b': '(2,3)'}; a token without '=' is refused."""
    out: dict[str, str] = {}
    for tok in tokens or []:
        if "=" not in tok:
            raise UserError(f"--exp-options takes key=value pairs, got '{tok}' (e.g. --exp-options exp_name=run1 lr=1e-3)")
        k, v = tok.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _split_seq(text: str) -> list[str]:
    text = text.strip()
    if text[:1] in "([" and text[-1:] in ")]":
        text = text[1:-1]
    return [t.strip() for t in text.split(",") if t.strip()]


class _Bad(ValueError):
    """A conversion failure whose message is worth showing."""


def type_name(tp: Any) -> str:
    if typing.get_args(tp) or not isinstance(tp, type):
        return str(tp).replace("typing.", "")
    return tp.__name__


def convert(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (a command-line string or a Python value) to type `tp`, or raise a one-line UserError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(key, value, inner[0])
    try:
        if origin in (tuple, list):
            items = _split_seq(value) if isinstance(value, str) else list(value)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(items) != len(args):
                    raise _Bad(f"{len(args)} values")
                conv = [convert(key, v, a) for v, a in zip(items, args)]
            else:
                conv = [convert(key, v, args[0] if args else str) for v in items]
            return tuple(conv) if origin is tuple else conv
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE or s in _FALSE:
                return s in _TRUE
            raise _Bad("true or false")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise _Bad("an integer")
            return int(value) if not isinstance(value, str) else int(value.strip())
        if tp is float:
            if isinstance(value, bool):
                raise _Bad("a number")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise _Bad("a string")
            return value.strip().strip("'\"")
    except _Bad as e:
        raise UserError(f"option '{key}' expects {type_name(tp)} ({e}), got {value!r}") from None
    except (ValueError, TypeError):
        raise UserError(f"option '{key}' expects {type_name(tp)}, got {value!r}") from None
    return value


def unknown_key_error(key: str, known: list[str], recipe: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else "; run ssl_train -f RECIPE --show-config to list them"
    return UserError(f"unknown option '{key}' for recipe {recipe}{hint}")
