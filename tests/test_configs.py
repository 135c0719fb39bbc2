"""gossip.configs on a tiny dataclass: flags 1:1, bools, TOML files, type checks."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gossip import configs
from gossip.configs import help_text


@dataclass(frozen=True, kw_only=True)
class Tiny:
    steps: int = field(default=3, metadata=help_text("how many"))
    rate: float = 0.5
    name: str | None = None
    fast: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        configs.check_types(self)
        configs.check_positive("rate", self.rate)


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def test_field_types() -> None:
    assert dict(configs.field_types(Tiny)) == {
        "steps": (int, False), "rate": (float, False), "name": (str, True),
        "fast": (bool, False), "limit": (int, True)}


def test_one_flag_per_field_and_config() -> None:
    flags = _flags(configs.build_parser(Tiny, prog="tiny"))
    assert set(flags) - {"-h", "--help"} == {"--config", "--steps", "--rate", "--name", "--fast",
                                             "--no-fast", "--limit"}
    for f in dataclasses.fields(Tiny):
        assert flags[configs.field_flag(f.name)].dest == f.name
    assert configs.field_flag("sync_every") == "--sync-every"
    assert flags["--steps"].help == "how many (default: 3)"
    assert flags["--name"].help == ""  # no help, default None: nothing appended
    assert "--rate" not in _flags(configs.build_parser(Tiny, exclude=("rate",)))


def test_unset_flags_are_absent_and_bools_take_no() -> None:
    parser = configs.build_parser(Tiny)
    assert vars(parser.parse_args([])) == {}
    assert vars(parser.parse_args(["--fast"])) == {"fast": True}
    assert vars(parser.parse_args(["--no-fast", "--steps", "7"])) == {"fast": False, "steps": 7}
    assert configs.from_args(Tiny, ["--fast", "--rate", "2"]) == Tiny(fast=True, rate=2.0)
    assert configs.from_args(Tiny, []) == Tiny()


def test_toml_loads_and_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text('steps = 5\nname = "x"\nfast = true\n')
    assert configs.load_toml(Tiny, path) == {"steps": 5, "name": "x", "fast": True}
    cfg = configs.from_args(Tiny, ["--config", str(path), "--steps", "9", "--no-fast"])
    assert cfg == Tiny(steps=9, name="x", fast=False)


def test_toml_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("stepz = 5\n")
    with pytest.raises(ValueError, match="unknown key 'stepz'") as info:
        configs.load_toml(Tiny, path)
    assert str(info.value).startswith(f"{path}: ")
    path.write_text("steps = \n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        configs.load_toml(Tiny, path)
    with pytest.raises(ValueError, match=r"config='.*missing.toml' is invalid: no such file"):
        configs.load_toml(Tiny, tmp_path / "missing.toml")


@pytest.mark.parametrize(("fields", "message"), [
    ({"steps": 2.5}, "steps=2.5 is invalid: expected int"),
    ({"steps": True}, "steps=True is invalid: expected int"),
    ({"limit": "3"}, "limit='3' is invalid: expected int or None"),
    ({"rate": False}, "rate=False is invalid: expected float"),
    ({"fast": 1}, "fast=1 is invalid: expected bool"),
    ({"rate": 0}, "rate=0.0 is invalid: expected a number > 0"),
])
def test_type_errors_name_field_and_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Tiny(**fields)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_int_becomes_float() -> None:
    cfg = Tiny(rate=2)
    assert cfg.rate == 2.0 and type(cfg.rate) is float
    assert Tiny(limit=None).limit is None


def test_bad_and_check_positive() -> None:
    with pytest.raises(ValueError, match=r"^x='a' is invalid: expected something$"):
        configs.bad("x", "a", "something")
    configs.check_positive("x", None)
    configs.check_positive("x", 1e-9)
    with pytest.raises(ValueError, match=r"^x=-1 is invalid: expected a number > 0$"):
        configs.check_positive("x", -1)
