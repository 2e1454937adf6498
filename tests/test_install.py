"""A non-editable install works outside the source tree: the DeepSpeed JSON configs and the job
configs ship as package data, and a training run finds its DeepSpeed config there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps --no-build-isolation --target <tmp> .`` (a copy, not a link to the checkout)."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                           "--no-build-isolation", "--no-cache-dir", "--target", str(target), str(ROOT)],
                          capture_output=True, text=True, cwd=build, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _outside(installed: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_package_data_is_installed_and_used(installed, tmp_path):
    code = ("import json, dist_fair, dist_fair.config as c, dist_fair.train.engine as e; "
            "print(json.dumps({'pkg': dist_fair.__file__, 'ds': str(e.DEEPSPEED_CONFIG_DIR), "
            "'stage': e.load_deepspeed_config('zero1_cpu')['zero_optimization']['stage'], "
            "'shipped': sorted(p.name for p in c.SHIPPED_CONFIGS.glob('*.yaml')), "
            "'model': c.load_config('mnist_usps_dfdc').train.model}))")
    proc = _outside(installed, tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["pkg"].startswith(str(installed)) and facts["ds"].startswith(str(installed))
    assert facts["stage"] == 1
    assert {"default.yaml", "mnist_usps_dfdc.yaml", "adult_fair_dec.yaml", "lfw.yaml"} <= set(facts["shipped"])
    assert facts["model"] == "dfdc"
    for name in ("zero0_cpu", "zero1_cpu", "zero2_cpu", "zero3_cpu", "zero1_gpu"):
        assert (installed / "dist_fair" / "configs" / "deepspeed" / f"{name}.json").is_file()


@pytest.mark.ray
def test_training_from_outside_the_source_tree_finds_its_deepspeed_config(installed, tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys; from dist_fair.cli import main; sys.exit(main(['train', '--no-progress', '--run-dir', "
            f"{str(run_dir)!r}, '--set', 'train.model=probe', '--set', 'train.workers=1', '--set', "
            "'train.deepspeed=zero1_cpu', '--set', 'train.epochs=1', '--set', 'train.batch_size=32', '--set', "
            "'train.hidden=8', '--set', 'data.preset=balanced', '--set', 'data.identities=20', '--set', 'data.images_per_identity=4', '--set', "
            "'data.dim=8', '--set', 'data.workers=1', '--set', 'ray.num_cpus=2']))")
    proc = _outside(installed, tmp_path, code)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    start = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
             if '"start"' in line][0]
    assert start["zero_stage"] == 1 and start["world_size"] == 1
    assert (run_dir / "train" / "model.pt").is_file()
