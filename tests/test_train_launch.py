"""launch/: the cluster launcher YAML, the SLURM script and the DeepSpeed configs are well formed."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def test_cluster_yaml_passes_rays_own_validation():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "local"
    assert any("dist-fair train --build-ops" in c for c in config["setup_commands"])  # op cache built per node


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_slurm_script_is_valid_bash_and_runs_dist_fair_train():
    script = LAUNCH / "slurm.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "ray\" start --head" in text and "dist-fair\" train --address" in text and "#SBATCH --nodes" in text


def test_deepspeed_configs_cover_zero_stages_for_cpu_and_gpu():
    for stage in range(4):
        for device in ("cpu", "gpu"):
            config = json.loads((LAUNCH / "deepspeed" / f"zero{stage}_{device}.json").read_text())
            assert config["zero_optimization"]["stage"] == stage
            assert "train_batch_size" not in config  # filled in from train.batch_size


def test_readme_has_the_cluster_section_and_the_op_cache():
    text = (LAUNCH / "README.md").read_text()
    assert "## From one machine to a cluster" in text
    assert "torch_extensions" in text and "--build-ops" in text and "shared" in text.lower()
