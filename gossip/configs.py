"""Frozen keyword-only dataclasses as command lines and TOML files: one flag and one key a field.

:func:`build_parser` gives every field of a dataclass a flag (``sync_every`` <-> ``--sync-every``;
a bool field gets ``--x/--no-x``) plus ``--config FILE.toml``, and leaves unset flags out of the
result, so :func:`from_args` applies dataclass defaults < the TOML file < the command line. TOML
keys are field names, with ``-`` or ``_``. :func:`check_types` (call it from ``__post_init__``)
checks each value against its annotation. Every error is a ValueError naming field and value:
``name=value is invalid: expected ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

__all__ = [
    "FileConfig",
    "bad",
    "build_parser",
    "check_positive",
    "check_types",
    "field_flag",
    "field_types",
    "from_args",
    "help_text",
    "load_toml",
    "parse_seeds",
]

T = TypeVar("T")


class FileConfig:
    """Mixin of a frozen config dataclass: :meth:`to_dict` and :meth:`from_toml`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_toml(cls: type[T], path: str | Path, **overrides: Any) -> T:
        """Load a TOML file (keys = field names, ``-`` or ``_``); ``overrides`` win."""
        return cls(**{**load_toml(cls, path), **overrides})


def help_text(text: str) -> dict[str, str]:
    """Field metadata holding the flag's help: ``field(..., metadata=help_text("..."))``."""
    return {"help": text}


@functools.cache
def field_types(cls: type) -> Mapping[str, tuple[type, bool]]:
    """``{name: (base type, optional)}`` for every field of the dataclass ``cls``.

    ``int | None`` gives ``(int, True)``, ``float`` gives ``(float, False)``.
    """
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, bool]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            base = next(a for a in args if a is not type(None))
            out[f.name] = (base, type(None) in args)
        else:
            out[f.name] = (hint, False)
    return types.MappingProxyType(out)


def check_types(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation.

    An int given for a float field becomes that float (also on frozen instances); a bool never
    passes for an int or a float. Raises ValueError naming the field and its value.
    """
    for name, (base, optional) in field_types(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, name, float(value))
            continue
        ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
        if not ok:
            bad(name, value, base.__name__ + (" or None" if optional else ""))


def bad(name: str, value: Any, expected: str) -> NoReturn:
    """Raise ``ValueError("name=value is invalid: expected <expected>")``."""
    raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def check_positive(name: str, value: float | None) -> None:
    """None passes; anything else must be > 0."""
    if value is not None and not value > 0:
        bad(name, value, "a number > 0")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (distinct integers >= 0), for ``--seeds`` flags."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds={text!r} is invalid: expected integers like 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={text!r} is invalid: expected distinct integers >= 0")
    return seeds


def field_flag(name: str) -> str:
    """``sync_every`` -> ``--sync-every``."""
    return "--" + name.replace("_", "-")


def build_parser(cls: type, *, prog: str | None = None, description: str | None = None,
                 exclude: Collection[str] = ()) -> argparse.ArgumentParser:
    """One flag per field of ``cls`` (but ``exclude``) and ``--config``; unset flags stay absent.

    Help comes from the field's ``metadata["help"]``, followed by its default when not None.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.toml", help="load fields from a TOML file "
                        "(flags on the command line override it)")
    types_ = field_types(cls)
    # the class's own fields first; each dataclass base's fields after them, in a group titled
    # by the first line of the base's docstring
    sections: list[tuple[type, list[dataclasses.Field[Any]]]] = []
    seen: set[str] = set()
    for owner in cls.__mro__:
        declared = vars(owner).get("__annotations__", {})
        own = [f for f in dataclasses.fields(cls) if f.name in declared and f.name not in seen]
        seen.update(f.name for f in own)
        if own:
            sections.append((owner, own))
    for owner, fields in sections:
        target: Any = parser
        if owner is not cls:
            title = (owner.__doc__ or owner.__name__).strip().splitlines()[0]
            target = parser.add_argument_group(title)
        for f in fields:
            if f.name in exclude:
                continue
            base, _ = types_[f.name]
            text = f.metadata.get("help", "")
            if f.default is not None and f.default is not dataclasses.MISSING:
                text += f" (default: {f.default})"
            if base is bool:
                target.add_argument(field_flag(f.name), dest=f.name,
                                    action=argparse.BooleanOptionalAction, help=text)
            else:
                target.add_argument(field_flag(f.name), dest=f.name, type=base,
                                    metavar=f.name.upper(), help=text)
    return parser


def load_toml(cls: type, path: str | Path) -> dict[str, Any]:
    """Read a flat TOML file of ``cls``'s fields into ``{field: value}`` (not yet checked).

    Keys may use ``-`` or ``_``. A missing file, bad TOML or an unknown key raises ValueError
    naming the file (and the key).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"config={str(path)!r} is invalid: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config={str(path)!r} is not valid TOML: {e}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ValueError(f"{path}: unknown key {key!r}; known: {', '.join(sorted(names))}")
        if name in out:  # drop-prob and drop_prob: one field, two values
            raise ValueError(f"{path}: keys {keys[name]!r} and {key!r} both set {name} "
                             f"({out[name]!r}, {value!r}): keep one")
        out[name], keys[name] = value, key
    return out


def from_args(cls: type[T], argv: Sequence[str] | None = None, *,
              parser: argparse.ArgumentParser | None = None) -> T:
    """Parse ``argv`` (``sys.argv[1:]`` by default) with ``parser`` (default: ``build_parser(cls)``)
    into a ``cls``: its defaults < the ``--config`` file < the flags given."""
    ns = vars((parser or build_parser(cls)).parse_args(argv))
    config_file = ns.pop("config", None)
    base: Mapping[str, Any] = load_toml(cls, config_file) if config_file else {}
    return cls(**{**base, **ns})
