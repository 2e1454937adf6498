"""dist_fair.train.progress: the JSON-lines history and the human progress lines."""
from __future__ import annotations

import json

from dist_fair.train.progress import MetricsLog, ProgressMonitor, Throughput, epoch_line, format_duration, read_metrics


def test_metrics_log_appends_atomically_and_continues_after_restart(tmp_path):
    path = tmp_path / "train" / "metrics.jsonl"
    log = MetricsLog(path)
    log.append({"event": "start", "attempt": 1})
    log.append({"event": "train", "step": 5, "loss": float("nan")})
    again = MetricsLog(path)  # a restarted attempt continues the same file
    again.append({"event": "start", "attempt": 2})
    records = read_metrics(path)
    assert [r["event"] for r in records] == ["start", "train", "start"]
    assert records[1]["loss"] is None  # NaN is not JSON: written as null
    assert all(json.loads(line) for line in path.read_text().splitlines())
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind


def test_read_metrics_skips_torn_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"event": "start"}\n{"event": "tra\n')
    assert read_metrics(path) == [{"event": "start"}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_epoch_line_and_eta():
    line = epoch_line({"epoch": 1, "step": 120, "loss": 0.53123, "samples_per_s": 3456.7, "eta_s": 83,
                       "eval_accuracy": 0.9}, epochs=5)
    assert line.startswith("epoch 2/5  step 120  loss 0.5312  3,457 samples/s  ETA 0:01:23")
    assert "eval_accuracy 0.9" in line
    assert format_duration(None) == "?" and format_duration(3725) == "1:02:05"
    meter = Throughput(total_steps=100, samples_per_step=10)
    rate, eta = meter.window(10)
    assert rate > 0 and eta is not None and eta > 0


def test_progress_monitor_follows_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    with ProgressMonitor(path, total_steps=10, epochs=1, interval_s=0.05) as monitor:
        log.append({"event": "start", "attempt": 1, "step": 0})
        log.append({"event": "train", "step": 4, "loss": 1.0, "samples_per_s": 10.0, "eta_s": 3})
        monitor.poll()
        assert monitor._bar.n == 4
        log.append({"event": "epoch", "epoch": 0, "step": 10, "loss": 0.5})
    assert monitor._bar.n == 10
