"""Registry, discovery through entry points, and option checking."""

import importlib.metadata as md
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from surgeon import GraphPlugin, ModelPlugin
from surgeon.errors import PluginLoadError, UsageError
from surgeon.plugin import Registry, option_help, parse_options, registry

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))


def ep(name, value):
    return md.EntryPoint(name=name, value=value, group="surgeon.plugins")


def test_builtins_are_registered():
    names = registry().names()
    for builtin in ("tucker", "svd", "int8"):
        assert builtin in names, names


def test_entry_point_plugin_is_loaded(fixtures_on_path):
    reg = registry([ep("relu-clip", "relu_clip_plugin:PLUGINS")])
    assert "relu-clip" in reg
    assert "relu_clip_plugin" in reg.origin("relu-clip")


def test_entry_point_that_fails_to_import_names_its_package():
    with pytest.raises(PluginLoadError, match="package 'no_such_pkg'.*ModuleNotFoundError"):
        registry([ep("broken", "no_such_pkg.plugin:PLUGINS")], strict=True)


def test_a_broken_plugin_is_reported_and_skipped_and_the_others_work(fixtures_on_path):
    """Issue 8: one third-party plugin that failed to import stopped every command, built-ins included."""
    reg = registry([ep("broken", "no_such_pkg.plugin:PLUGINS"), ep("relu-clip", "relu_clip_plugin:PLUGINS")])
    assert {"tucker", "svd", "int8", "relu-clip"} <= set(reg.names())
    (failure,) = reg.failures
    assert (failure.name, failure.package, failure.entry_point) == ("broken", "no_such_pkg", "no_such_pkg.plugin:PLUGINS")
    assert "ModuleNotFoundError" in failure.error and "skipped" in str(failure)
    with pytest.raises(PluginLoadError, match="package 'no_such_pkg'"):
        reg.get("broken")  # asking for it by name says why it is missing


def test_a_plugin_that_raises_anything_on_import_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "explodes_on_import.py").write_text("raise SyntaxError('bad plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = registry([ep("boom", "explodes_on_import:PLUGINS")])
    assert "tucker" in reg and [f.name for f in reg.failures] == ["boom"]


def test_entry_point_that_is_not_a_plugin(fixtures_on_path):
    with pytest.raises(PluginLoadError, match="not a surgeon plugin"):
        registry([ep("odd", "relu_clip_plugin:Options")], strict=True)
    reg = registry([ep("odd", "relu_clip_plugin:Options")])
    assert "not a surgeon plugin" in reg.failures[0].error and "tucker" in reg


def test_duplicate_names_are_an_error(fixtures_on_path):
    with pytest.raises(PluginLoadError, match="two plugins are named 'relu-clip'"):
        registry([ep("a", "relu_clip_plugin:PLUGINS"), ep("b", "relu_clip_plugin:ReluToClip")], strict=True)
    reg = registry([ep("a", "relu_clip_plugin:PLUGINS"), ep("b", "relu_clip_plugin:ReluToClip")])
    assert "relu-clip" in reg and "a" in reg.origin("relu-clip")  # the first one stays
    assert [f.name for f in reg.failures] == ["b"] and "two plugins are named" in reg.failures[0].error


def test_third_party_cannot_shadow_a_builtin():
    class Fake(GraphPlugin):
        name = "tucker"
        summary = "impostor"

    reg = Registry()
    reg.load_builtins()
    with pytest.raises(PluginLoadError, match="two plugins are named 'tucker'"):
        reg.register(Fake, origin="package 'evil'")


def test_unknown_plugin_lists_available():
    with pytest.raises(UsageError, match="unknown plugin 'nope'; available: .*tucker"):
        registry().get("nope")


@dataclass
class Opts:
    ratio: float | None = field(default=None, metadata={"help": "r"})
    ranks: tuple[int, int] | None = None
    method: Literal["hosvd", "hooi"] = "hosvd"
    flag: bool = False
    names: list[str] = field(default_factory=list)
    count: int = 1

    def check(self):
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")


class P(ModelPlugin):
    name = "p"
    summary = "s"
    Options = Opts


def test_options_are_parsed_from_strings():
    o = parse_options(P(), {"ratio": "0.5", "ranks": "3,4", "method": "hooi", "flag": "yes", "names": "a,b",
                            "count": "7"})
    assert (o.ratio, o.ranks, o.method, o.flag, o.names, o.count) == (0.5, (3, 4), "hooi", True, ["a", "b"], 7)


@pytest.mark.parametrize("values,message", [
    ({"rato": "0.5"}, "no option 'rato'; valid options: count, flag, method, names, ranks, ratio"),
    ({"method": "svd"}, "bad value 'svd' for option 'method'.*hosvd|hooi"),
    ({"ranks": "3"}, "option 'ranks'"),
    ({"count": "x"}, "option 'count'"),
    ({"ratio": "1.5"}, "ratio must be in"),
])
def test_bad_options_are_clear(values, message):
    with pytest.raises(UsageError, match=message):
        parse_options(P(), values)


def test_option_help_lists_every_field():
    rows = option_help(P())
    assert [r[0] for r in rows] == ["ratio", "ranks", "method", "flag", "names", "count"]
    assert rows[0][3] == "r"
