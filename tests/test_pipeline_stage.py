"""dist_fair.pipeline.stage: the one helper that fingerprints, skips, resumes and clears stages;
the shards stage's fingerprint is the digest of the shards' content."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dist_fair.pipeline.stage import PENDING_RECORD, STAGE_RECORD, JobContext, fingerprint


def _ctx(tmp_path, **kw):
    return JobContext(config=None, run_dir=tmp_path, **kw)


def test_complete_stage_is_skipped_and_changed_params_clear_the_folder(tmp_path):
    calls = []

    def work(folder):
        calls.append(folder)
        (folder / "out.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    first = _ctx(tmp_path).stage("s", "s", {"a": 1}).run(work)
    assert not first.skipped and first.info == {"n": 1}
    record = json.loads((tmp_path / "s" / STAGE_RECORD).read_text())
    assert record["fingerprint"] == first.fingerprint and record["params"] == {"a": 1}
    assert not (tmp_path / "s" / PENDING_RECORD).exists()
    again = _ctx(tmp_path).stage("s", "s", {"a": 1}).run(work)
    assert again.skipped and again.info == {"n": 1} and len(calls) == 1
    (tmp_path / "s" / "stale.bin").write_bytes(b"x")
    changed = _ctx(tmp_path).stage("s", "s", {"a": 2}).run(work)
    assert not changed.skipped and changed.fingerprint != first.fingerprint
    assert not (tmp_path / "s" / "stale.bin").exists()  # output of other settings never survives
    fresh = _ctx(tmp_path, fresh=True).stage("s", "s", {"a": 2}).run(work)
    assert not fresh.skipped and len(calls) == 3


def test_upstream_fingerprints_are_part_of_the_key(tmp_path):
    up1 = _ctx(tmp_path).stage("up", "up", {"x": 1}).run(lambda f: {})
    up2 = _ctx(tmp_path).stage("up", "up2", {"x": 2}).run(lambda f: {})
    a = _ctx(tmp_path).stage("down", "d", {}, [up1])
    b = _ctx(tmp_path).stage("down", "d", {}, [up2])
    assert a.key != b.key
    assert a.key == fingerprint({"stage": "down", "params": {}, "upstream": [up1.fingerprint]})


def test_a_killed_stage_resumes_in_its_folder_with_the_same_key(tmp_path):
    def killed(folder):
        (folder / "part-0.npy").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _ctx(tmp_path).stage("s", "s", {"a": 1}).run(killed)
    assert (tmp_path / "s" / PENDING_RECORD).exists() and not (tmp_path / "s" / STAGE_RECORD).exists()

    seen = {}

    def resumed(folder):
        seen["part"] = (folder / "part-0.npy").exists()
        return {}

    _ctx(tmp_path).stage("s", "s", {"a": 1}).run(resumed)
    assert seen["part"]  # same key: the partial work is kept for the stage to resume
    with pytest.raises(KeyboardInterrupt):
        _ctx(tmp_path).stage("s", "s", {"a": 3}).run(killed)
    _ctx(tmp_path).stage("s", "s", {"a": 4}).run(resumed)
    assert not seen["part"]  # another key: cleared first


def test_plan_mode_runs_nothing(tmp_path):
    done = _ctx(tmp_path).stage("s", "s", {"a": 1}).run(lambda f: {"k": 1})
    ctx = _ctx(tmp_path, plan=True)
    skipped = ctx.stage("s", "s", {"a": 1}).run(lambda f: pytest.fail("plan mode ran a complete stage"))
    todo = ctx.stage("t", "t", {}, [done]).run(lambda f: pytest.fail("plan mode ran a stage"))
    after = ctx.stage("u", "u", {}, [todo]).run(lambda f: pytest.fail("plan mode ran a stage"))
    assert skipped.complete and skipped.info == {"k": 1}
    assert not todo.complete and not after.complete and not (tmp_path / "t").exists()
    assert [o.name for o in ctx.outcomes] == ["s", "t", "u"]


def test_external_shards_fingerprint_follows_their_content(tmp_path):
    from dist_fair.config import load_config
    from dist_fair.data.shards import write_embedding_shards
    from dist_fair.pipeline.data_stage import shards_stage

    def write(seed):
        emb = np.random.default_rng(seed).normal(size=(40, 4)).astype(np.float32)
        write_embedding_shards(tmp_path / "ext", emb, np.arange(40) % 5, {"g": np.arange(40) % 2}, {"g": ["a", "b"]},
                               shard_rows=20, block_rows=10)

    write(1)
    config = load_config(None, ["data.source=shards", f"data.shards={tmp_path / 'ext'}"])
    first = shards_stage(JobContext(config, tmp_path / "run"))
    assert first.skipped and first.info["external"] and first.info["samples"] == 40
    assert shards_stage(JobContext(config, tmp_path / "run")).fingerprint == first.fingerprint
    import shutil

    shutil.rmtree(tmp_path / "ext")
    write(2)  # same path, same settings, other bytes
    second = shards_stage(JobContext(config, tmp_path / "run"))
    assert second.fingerprint != first.fingerprint


def test_job_paths_are_made_absolute_for_the_ray_workers(tmp_path, monkeypatch):
    from dist_fair.config import load_config
    from dist_fair.pipeline.job import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(load_config(None, ["run_dir=runs/x", "data.source=shards", "data.shards=shards/s"]))
    assert config.run_dir == str(tmp_path / "runs" / "x")
    assert config.data.shards == str(tmp_path / "shards" / "s") and config.data.path is None
