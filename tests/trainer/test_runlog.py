"""The run log both trainers write: whole records back, a line cut by a crash skipped, rewind to a checkpoint."""

import json

from l2c.trainer.runlog import RunLog, read_metrics


def test_cut_last_line_is_skipped_and_rewind_keeps_checkpointed_records(tmp_path):
    log = RunLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # kill -9 in the middle of a write
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3, 4, 5]
    log.rewind(lambda r: r["step"] <= 3)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3]
    log.rewind(None)
    assert read_metrics(log.path) == []
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_only_rank_zero_writes(tmp_path):
    RunLog(tmp_path / "m.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "m.jsonl").exists()
