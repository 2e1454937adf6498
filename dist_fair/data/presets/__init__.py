"""Calibrated generator presets (METHODS.md §2): YAML files, shipped as package data or given as a path.

A preset file holds (see ``realistic.yaml``, written by :mod:`dist_fair.data.presets.build_realistic`,
and any file written by ``dist-fair shards synth --calibrate``):

- ``name``, ``default_dim``;
- ``dims``: per embedding dimension d, the fitted ``crowding``, ``spread``, ``dispersion`` tables
  (keys: a race, a gender or a cell ``Race/gender``) and ``group_cosine`` - the fitted values
  depend on d (:mod:`dist_fair.data.calibration`);
- optional ``mix`` (race shares), ``gender_mix`` and ``images_table`` (count -> people per gender);
- ``calibration``: the report of the fit (reference, quantiles, counts); the generator ignores it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dist_fair.errors import DataError

PRESET_DIR = Path(__file__).resolve().parent


def preset_path(name_or_path: str | Path) -> Path:
    """The file of a packaged preset name (``realistic``) or the given path."""
    text = str(name_or_path)
    packaged = PRESET_DIR / f"{text}.yaml"
    if "/" not in text and not text.endswith((".yaml", ".yml")) and packaged.is_file():
        return packaged
    path = Path(text)
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise DataError(f"preset {text!r} is neither a packaged preset {known} nor an existing YAML file; "
                        "write one with `dist-fair shards synth --calibrate SHARDS --out-preset FILE.yaml`")
    return path


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """The checked content of a preset (``dims`` keyed by int)."""
    path = preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"preset {path}: not a readable YAML file ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("dims"), dict) or not data["dims"]:
        raise DataError(f"preset {path}: needs a mapping 'dims' (dimension -> fitted crowding/spread/dispersion)")
    dims: dict[int, Any] = {}
    for key, fit in data["dims"].items():
        try:
            dim = int(key)
        except (TypeError, ValueError) as err:
            raise DataError(f"preset {path}: dims key {key!r} is not an integer dimension") from err
        if not isinstance(fit, dict) or not {"crowding", "spread"} <= set(fit):
            raise DataError(f"preset {path}: dims[{dim}] needs 'crowding' and 'spread' tables")
        dims[dim] = fit
    data["dims"] = dims
    data.setdefault("default_dim", min(dims))
    if int(data["default_dim"]) not in dims:
        raise DataError(f"preset {path}: default_dim {data['default_dim']} has no entry in dims {sorted(dims)}")
    data.setdefault("name", path.stem)
    return data


__all__ = ["PRESET_DIR", "preset_path", "load_preset"]
