"""Every config field has an effect: something in the package reads it.

The check walks the ``JobConfig`` dataclass tree and, for every field, looks for an attribute
access ``.<field>`` (a NAME token right after a ``.`` operator) or a ``getattr(..., "<field>")``
anywhere in ``dist_fair/`` outside ``config.py`` (where fields are only declared and validated).
It cannot prove the value changes the output, but a field nothing reads fails it; the checker
itself is tested on a dataclass with a field nobody reads. Also: every hyper-parameter a
registered model declares (``dist_fair/model_registry.py``) is a real config field.
"""
from __future__ import annotations

import dataclasses
import io
import re
import tokenize
import typing
from pathlib import Path

import pytest

import dist_fair
from dist_fair.config import JobConfig

PACKAGE = Path(dist_fair.__file__).resolve().parent


def config_fields(cls: type = JobConfig, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of a dataclass tree (sections recurse)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_fields(hints[f.name], name + ".")
        else:
            out.append(name)
    return out


def attributes_read(root: Path = PACKAGE, skip: tuple[str, ...] = ("config.py",)) -> set[str]:
    """Every ``x.<name>`` attribute and every ``getattr(x, "<name>")`` in the package's modules."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if path.relative_to(root).as_posix() in skip:
            continue
        source = path.read_text(encoding="utf-8")
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        for before, token in zip(tokens, tokens[1:]):
            if before.type == tokenize.OP and before.string == "." and token.type == tokenize.NAME:
                names.add(token.string)
        names.update(re.findall(r"getattr\([^,]+,\s*[\"'](\w+)[\"']", source))
    return names


def unread(fields: list[str], read: set[str]) -> list[str]:
    return [f for f in fields if f.rsplit(".", 1)[-1] not in read]


def test_every_config_field_is_read_somewhere():
    missing = unread(config_fields(), attributes_read())
    assert not missing, f"config fields that nothing in dist_fair/ reads (wire them up or delete them): {missing}"


@dataclasses.dataclass
class _Section:
    used_here: int = 0
    nobody_reads_this_field: int = 0


@dataclasses.dataclass
class _Tree:
    section: _Section = dataclasses.field(default_factory=_Section)


def test_the_checker_finds_a_field_nobody_reads(tmp_path):
    (tmp_path / "config.py").write_text("x.nobody_reads_this_field = 1\n")  # declarations do not count
    (tmp_path / "stage.py").write_text("def f(c):\n    return c.section.used_here  # .nobody_reads_this_field\n")
    fields = config_fields(_Tree)
    assert fields == ["section.used_here", "section.nobody_reads_this_field"]
    assert unread(fields, attributes_read(tmp_path)) == ["section.nobody_reads_this_field"]


def test_registered_models_declare_real_config_fields():
    from dist_fair.model_registry import get_model, model_names

    known = set(config_fields())
    for name in model_names():
        entry = get_model(name)
        assert set(entry.config) <= known, (name, sorted(set(entry.config) - known))
        assert entry.family in ("sequence", "deep", "probe")


@pytest.mark.parametrize("override", ["train.model=dfdc", "deep.beta=6", "deep.vat_eps=0.25", "deep.ae_hidden=[64, 64]",
                                      "deep.pretrain_epochs=3", "deep.alpha=1e-4", "deep.mu=4", "deep.vat_xi=1",
                                      "fair.eps=0.1", "fair.workers=2", "train.penalty_weight=0.5"])
def test_method_hyper_parameters_are_settable_from_set(override):
    from dist_fair.config import load_config

    config = load_config(None, [override])
    section, name = override.split("=")[0].split(".")
    value = getattr(getattr(config, section), name)
    assert str(value).replace(" ", "") in override.replace(" ", "") or value == pytest.approx(float(override.split("=")[1]))
