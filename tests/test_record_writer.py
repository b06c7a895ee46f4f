"""RecordWriter (tracking/records.py), the background writer of metrics and params, against a fake store
client: everything queued is written, in order, within the store's batch limits, before close()
returns; a failed write is reported by close(), not raised into the training loop."""

from __future__ import annotations

import threading
from typing import Any

from cifar_exp.tracking.records import RecordWriter


class FakeClient:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[tuple[str, list, list]] = []
        self.fail = fail
        self.threads: set[str] = set()

    def log_batch(self, run_id: str, metrics: list[Any], params: list[Any], tags: list[Any] = ()) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("database is locked\nmore detail")
        self.batches.append((run_id, metrics, params))


def test_close_waits_for_every_queued_metric_and_param() -> None:
    client = FakeClient()
    writer = RecordWriter(client, "run")
    writer.log_params({f"key{i}": str(i) for i in range(250)})  # more than the store's 100 per call
    for step in range(1, 501):
        writer.log_metrics({"train/loss": 1 / step, "lr": 0.1}, step)
    assert writer.close() is None
    assert all(run_id == "run" for run_id, _, _ in client.batches)
    for _, metrics, params in client.batches:  # the store's limits per call
        assert len(params) <= 100 and len(metrics) + len(params) <= 1000
    params = [p for _, _, ps in client.batches for p in ps]
    assert [(p.key, p.value) for p in params] == [(f"key{i}", str(i)) for i in range(250)]
    losses = [(m.step, m.value) for _, ms, _ in client.batches for m in ms if m.key == "train/loss"]
    assert losses == [(step, 1 / step) for step in range(1, 501)]
    assert client.threads == {"mlflow-record-writer"}  # never the training thread


def test_a_failed_write_is_reported_at_close() -> None:
    writer = RecordWriter(FakeClient(fail=True), "run")
    writer.log_metrics({"train/loss": 1.0}, 1)  # does not raise here, in the training loop
    assert writer.close() == "database is locked"
