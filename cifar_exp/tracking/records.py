"""The record writer: a background thread that opens the run, then writes its metrics, params and
files, so training never waits for MLflow (not even for importing it); what the store does not
take goes to a spill file in the run's folder."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifar_exp.errors import first_line
from cifar_exp.tracking.store import StoreHealth, backoff, transient

log = logging.getLogger(__name__)

# What the store could not take stays in the run's Hydra output folder, under these names.
UNRECORDED_METRICS = "unrecorded_metrics.jsonl"  # one JSON object per metric or param
UNRECORDED_ARTIFACTS = "unrecorded_artifacts"

Opener = Callable[[], tuple[Any, str]]  # opens (or reopens) the run: (MlflowClient, run id)
Call = Callable[[Any, str], None]  # a store call made in order with the records: (client, run id)


class RecordWriter:
    """Writes metrics and params to the store from a background thread: the training loop only
    puts plain tuples on a queue. Whatever piles up while a write is in flight goes out as one
    batch. With an `opener`, the thread first opens the run (importing MLflow, creating the store
    and the run); until then records wait on the queue.

    A store that is busy or does not answer (SQLite locked, a tracking server down) is retried with
    backoff, and what piles up meanwhile is written when it answers again. After `retry_s` of
    silence, or at once when the store refuses a write, those records go to `spill_path` (JSON
    lines, announced in one line) instead; later batches try the store again. Training never waits.

    MLflow's own asynchronous logging (`synchronous=False`) polls its queue with a 1 s timeout,
    and flushing it, then ending the run, each waited out that poll: ~2 s per run. Here closing
    waits only for what is still queued (or, with the store silent, until `retry_s` has passed)."""

    def __init__(
        self,
        client: Any = None,
        run_id: str | None = None,
        spill_path: Path | None = None,
        retry_s: float | None = None,
        health: StoreHealth | None = None,
        opener: Opener | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.spill_path = spill_path  # None: what the store does not take is lost (and counted)
        self.health = health or StoreHealth(retry_s)
        self.opener = opener
        self.opened = threading.Event()  # set once the run is open, or opening failed
        self.open_error: str | None = None  # why the run could not be opened
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: str | None = None  # why the first records went unrecorded
        self.unrecorded = 0  # metrics and params the store did not take
        self.closing = False  # close() has been called (seen by the writer thread)
        self.thread = threading.Thread(target=self._drain, name="mlflow-record-writer", daemon=True)
        self.thread.start()

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)  # ms since the epoch, as MLflow stamps metrics
        self.queue.put(("metrics", [(k, float(v), now, step) for k, v in metrics.items()]))

    def params(self, params: dict[str, str]) -> None:
        self.queue.put(("params", list(params.items())))

    def call(self, call: Call) -> None:
        """call(client, run_id) in the writer thread, after the records queued before it; with
        run_id None when the run could not be opened."""
        self.queue.put(("calls", [call]))

    def flush(self) -> bool:
        """Waits until everything queued so far is written (or kept in spill_path), so that what
        follows (a checkpoint) never gets ahead of the store. Returns False at once, without
        waiting, while the store is failing: training never waits out an outage."""
        done = threading.Event()
        self.call(lambda client, run_id: done.set())
        while not done.wait(0.05):
            if self.health.failing or not self.thread.is_alive():
                return False
        return True

    def wait_open(self) -> str | None:
        """The run id once the run is open (None if it could not be opened)."""
        self.opened.wait()
        return self.run_id

    def close(self) -> str | None:
        """Waits until everything queued is written (or kept in spill_path); returns why some
        records went unrecorded, if any did."""
        self.queue.put(None)
        self.thread.join()
        return self.error

    def _open(self) -> None:
        try:
            if self.opener is not None:
                self.client, self.run_id = self.opener()
        except Exception as e:  # noqa: BLE001 - said by whoever waits on the run; records are spilled
            self.open_error = first_line(e)
            self.health.failed(given_up=True)
        finally:
            self.opened.set()

    def _drain(self) -> None:
        self._open()
        pending: dict[str, list] = {"metrics": [], "params": [], "calls": []}
        while not self.closing:
            self._take(pending, None)  # waits while nothing is pending
            if pending["metrics"] or pending["params"]:
                self._write_retrying(pending)
            calls, pending["calls"] = pending["calls"], []
            for call in calls:
                call(self.client, self.run_id)

    def _write_retrying(self, pending: dict[str, list]) -> None:
        """Writes `pending`. While the store is busy or silent, tries again with backoff, collecting
        what is queued meanwhile into `pending` to write with it, until it is written, or kept in
        the spill file once the store has been silent for retry_s."""
        import tenacity

        error = tenacity.Retrying(
            retry=tenacity.retry_if_result(
                lambda failed: failed is not None and not self._spilled(pending, failed)
            ),
            wait=backoff(),
            sleep=lambda seconds: self._take(pending, time.monotonic() + seconds),
        )(self._write, pending)
        if error is None and (message := self.health.answered()):
            log.warning(message)

    def _spilled(self, pending: dict[str, list], error: str) -> bool:
        """A write failed with a transient `error`: False while it is to be retried; True once the
        store has been silent for retry_s, and what was pending is then in the spill file."""
        was_down = self.health.down
        if not self.health.failed("record metrics", error):
            return False
        if not was_down:
            silent = time.monotonic() - (self.health.failing_since or time.monotonic())
            error = f"no answer for {silent:.0f} s: {error}"
        self._spill(pending["metrics"], pending["params"], error)
        pending["metrics"], pending["params"] = [], []
        return True

    def _take(self, pending: dict[str, list], until: float | None) -> None:
        """Moves what is queued into `pending`: with `until` None it waits for the first item, else
        it collects until that time.monotonic(). Sets `closing` once close() has been called."""
        items = []
        if until is None:
            items.append(self.queue.get())  # blocks until there is something to write
        else:
            while (left := until - time.monotonic()) > 0:
                try:
                    items.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
        while not self.queue.empty():
            items.append(self.queue.get())
        for item in items:
            if item is None:
                self.closing = True
            else:
                pending[item[0]] += item[1]

    def _write(self, pending: dict[str, list]) -> str | None:
        """Writes `pending` and empties it; what the store refuses is spilled. When the store is
        busy or silent, returns that error and leaves in `pending` what is still to write."""
        if self.run_id is None:  # the run could not be opened: keep everything in the file
            self._spill(pending["metrics"], pending["params"], self.open_error or "no run")
            pending["params"], pending["metrics"] = [], []
            return None
        from mlflow.entities import Metric, Param

        # The store's limits per call: 1000 values of which at most 100 params.
        params, metrics = pending["params"], pending["metrics"]
        chunks = [([], params[i : i + 100]) for i in range(0, len(params), 100)]
        chunks += [(metrics[i : i + 1000], []) for i in range(0, len(metrics), 1000)]
        for n, (chunk_metrics, chunk_params) in enumerate(chunks):
            try:
                self.client.log_batch(
                    self.run_id,
                    metrics=[Metric(*m) for m in chunk_metrics],
                    params=[Param(*p) for p in chunk_params],
                )
            except Exception as e:
                if transient(e):
                    pending["params"] = [p for _, ps in chunks[n:] for p in ps]
                    pending["metrics"] = [m for ms, _ in chunks[n:] for m in ms]
                    return first_line(e)
                self._spill(chunk_metrics, chunk_params, first_line(e))
        pending["params"], pending["metrics"] = [], []
        return None

    def _spill(self, metrics: list, params: list, error: str) -> None:
        """Appends records the store did not take to spill_path, one JSON object a line."""
        if not metrics and not params:
            return
        first = self.unrecorded == 0
        self.error = self.error or error
        self.unrecorded += len(metrics) + len(params)
        if self.spill_path is None:
            if first:
                log.error(f"MLflow: could not record metrics or params ({error}); they are lost")
            return
        lines = [{"param": key, "value": value} for key, value in params]
        lines += [
            {"metric": key, "value": value, "step": step, "timestamp": timestamp}
            for key, value, timestamp, step in metrics
        ]
        if not self.keep(lines):
            return
        if first:
            log.warning(
                f"MLflow: could not record metrics or params ({error}); they go to {self.spill_path}, "
                "training goes on"
            )

    def keep(self, lines: list[dict[str, Any]]) -> bool:
        """Appends `lines` (each tagged with the run id) to spill_path, for `cifar-exp sync`:
        metrics, params, tags, the run's end ({"status": ...}), files kept ({"artifacts": ...}).
        Returns whether they are there."""
        if self.spill_path is None:
            return False
        try:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spill_path.open("a") as f:
                f.writelines(json.dumps({"run_id": self.run_id, **line}) + "\n" for line in lines)
        except OSError as e:
            log.error(f"MLflow: could not keep unrecorded metrics in {self.spill_path}: {e.strerror}")
            return False
        return True
