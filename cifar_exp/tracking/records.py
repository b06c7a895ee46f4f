"""The record writer: one background thread that opens the run, then makes every store call for
it in order (metrics, params and tags in batches, files, the lease's heartbeat, the run's end), so
training never waits for MLflow. A store that is busy or silent is retried with backoff for up to
retry_s, at most END_WAIT_S past the run's end; what it still does not take (or refuses) is kept in
the run's folder for `cifar-exp sync`, and later batches try it once each. Said in one line as an
outage begins, one when a call truly succeeds again, one at the end naming the sync command."""

from __future__ import annotations

import json
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cifar_exp.errors import first_line
from cifar_exp.tracking.identity import CHECKPOINT_TAG
from cifar_exp.tracking.leases import HEARTBEAT_S, TakenOver
from cifar_exp.tracking.store import backoff, retry_seconds, transient

log = logging.getLogger(__name__)

# What the store could not take stays in the run's Hydra output folder, under these names.
UNRECORDED_METRICS = "unrecorded_metrics.jsonl"  # one JSON object a line: metric, param, tag, end
UNRECORDED_ARTIFACTS = "unrecorded_artifacts"
END_WAIT_S = 3.0  # seconds a failing store is still retried once the run has ended

Opener = Callable[[], tuple[Any, str]]  # opens (or reopens) the run: (MlflowClient, run id)
Call = Callable[[Any, str], Any]  # a store call made in order with the records: (client, run id)
Files = dict[str, str | bytes]  # artifact path -> content
T = TypeVar("T")


def write_files(files: Files, folder: Path) -> None:
    """Each artifact path's text or bytes, as a file under `folder` (to be logged in one call)."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def batches(metrics: list, params: list, tags: list) -> list[tuple[list, list, list]]:
    """The calls of log_batch that take them, within the store's limits per call: 1000 values, of
    which at most 100 params and 100 tags."""
    calls = [(metrics[i : i + 1000], [], []) for i in range(0, len(metrics), 1000)]
    calls += [([], params[i : i + 100], []) for i in range(0, len(params), 100)]
    return calls + [([], [], tags[i : i + 100]) for i in range(0, len(tags), 100)]


class RecordWriter:
    """The run's handle for the runner, and its one writer to the store: the training loop only
    puts plain tuples on a queue, written in order from the writer's thread. With an `opener`, the
    thread first opens the run; until then records wait on the queue. `heartbeat(client, run_id)`
    runs every HEARTBEAT_S (the lease): it returns who took the run over, if someone did, and
    from then on nothing more is written. `recorded`: the (metric, step) points a resumed run holds
    already, not recorded twice."""

    enabled = True  # runs.Untracked stands in with tracking off

    def __init__(
        self,
        client: Any = None,
        run_id: str | None = None,
        spill_path: Path | None = None,
        retry_s: float | None = None,
        opener: Opener | None = None,
        uri: str = "the store",
        heartbeat: Call | None = None,
        recorded: set[tuple[str, int]] | None = None,
    ) -> None:
        self.client, self.run_id, self.opener, self.uri = client, run_id, opener, uri
        self.spill_path = spill_path  # None: what the store does not take is lost (and counted)
        self.retry_s = retry_seconds() if retry_s is None else retry_s
        self.heartbeat = heartbeat
        self.failing_since: float | None = None  # time.monotonic() of an outage's first failure
        self.down = False  # failing for retry_s: each call is tried once, what fails is kept
        self.ended_at: float | None = None  # time.monotonic() of close()
        self.ending = threading.Event()
        self.opened = threading.Event()
        self.open_error: str | None = None
        self.taken_over: str | None = None  # who continues the run instead (the heartbeat saw it)
        self.error: str | None = None  # why the first records went unrecorded
        self.unrecorded = 0  # metrics, params and tags kept in the folder (or lost)
        self.kept_files = False
        self.gave_up = False  # the run has ended and the store was down: no more tries
        self.recorded = recorded or set()
        self.checkpoint_tagged: Path | None = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="mlflow-record-writer", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ from the training thread
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, not written on the spot: training never waits for the store. A run another
        process has taken over stops here, in one line."""
        if self.taken_over:
            raise TakenOver(f"run {self.run_id} was taken over by process {self.taken_over}")
        now = int(time.time() * 1000)  # ms since the epoch, as MLflow stamps metrics
        points = [(k, float(v), now, step) for k, v in metrics.items() if (k, step) not in self.recorded]
        self.queue.put(("metrics", points))

    def log_params(self, params: dict[str, str]) -> None:
        """Params beside the config's (each key once per run: MLflow refuses a changed value)."""
        self.queue.put(("params", list(params.items())))

    def log_tags(self, tags: dict[str, str]) -> None:
        self.queue.put(("tags", list(tags.items())))

    def log_files(self, files: Files, what: str) -> None:
        """Writes `files` (artifact path -> text or bytes; "the weights" says `what`) to a new
        folder now; the writer's thread logs it in one call, then removes it."""
        if files:
            folder = Path(tempfile.mkdtemp(prefix="cifar_exp-artifacts-"))
            write_files(files, folder)
            self.queue.put(("files", [(folder, what)]))

    def set_checkpoint(self, path: Path) -> None:
        """Tags where this run's checkpoints go, for `cifar-exp resume RUN_ID`: called once the
        first one is written, so the tag never names a file that is not there (a resumed run's
        tag names its earlier checkpoint until then)."""
        if self.checkpoint_tagged != path:
            self.checkpoint_tagged = path
            self.log_tags({CHECKPOINT_TAG: str(path.resolve())})

    def call(self, call: Call, what: str | None = None, kept: dict | None = None) -> None:
        """call(client, run_id) after the records queued before it. With `what` it is a store call,
        retried like the records; `kept` (a spill line) is kept if the store does not take it.
        Without, it runs as is (run_id None when the run could not be opened)."""
        self.queue.put(("calls", [(call, what, kept)]))

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def _wait(self, event: threading.Event) -> bool:
        """Waits for `event`; False at once while the store is failing: training never waits."""
        while not event.wait(0.05):
            if self.failing or not self.thread.is_alive():
                return False
        return True

    def flush(self) -> bool:
        """Waits until everything queued so far is written (or kept), while the store does not
        fail: called before each checkpoint, so the store holds every step a checkpoint has
        trained, and a kill loses none."""
        done = threading.Event()
        self.call(lambda client, run_id: done.set())
        return self._wait(done)

    def wait_open(self) -> str | None:
        """The run id once the run is open; None if it could not be, or while the store fails (a
        checkpoint then names no run; `cifar-exp sync` records it later)."""
        return self.run_id if self._wait(self.opened) else None

    def close(self, end: dict[str, Any] | None = None) -> str | None:
        """Writes (or keeps) everything queued, then ends the run with `end` ({"status",
        "end_time"}; None leaves it as it is). Returns why some records went unrecorded, if any."""
        self.ended_at = time.monotonic()
        self.ending.set()
        self.queue.put(("end", [end]))
        self.queue.put(None)
        self.thread.join()
        return self.error

    # ------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        if self.opener is not None:
            opened, self.open_error = self._store(self.opener, "open the run")
            self.client, self.run_id = opened or (None, None)
        self.opened.set()
        beat, closing = time.monotonic() + HEARTBEAT_S, False
        while not closing:
            pending, closing = self._take(beat if self.heartbeat else None)
            if self.taken_over:  # not this process's run any more: what it would write is not kept
                pending.clear()
            self._write(pending["metrics"], pending["params"], pending["tags"])
            for folder, what in pending["files"]:
                self._log_files(folder, what)
            for call, what, kept in pending["calls"]:
                if what is None:
                    call(self.client, self.run_id)
                elif (error := self._record(lambda c=call: c(self.client, self.run_id), what)) and kept:
                    self.keep([kept], error)
            for end in pending["end"]:
                self._end(end)
            if self.heartbeat and time.monotonic() >= beat and self.run_id and not self.taken_over:
                beat = time.monotonic() + HEARTBEAT_S
                self.taken_over, _ = self._store(lambda: self.heartbeat(self.client, self.run_id), "")

    def _take(self, until: float | None) -> tuple[defaultdict[str, list], bool]:
        """What is queued, by kind, waiting for the first item until `until` (time.monotonic();
        None: as long as it takes); True once close() has been called."""
        pending: defaultdict[str, list] = defaultdict(list)
        try:
            timeout = None if until is None else max(0.0, until - time.monotonic())
            items = [self.queue.get(timeout=timeout)]
        except queue.Empty:
            return pending, False
        while not self.queue.empty():
            items.append(self.queue.get())
        for item in items:
            if item is not None:
                pending[item[0]] += item[1]
        return pending, None in items

    def _store(self, call: Callable[[], T], what: str) -> tuple[T | None, str | None]:
        """call(), retried with backoff while it fails transiently and the store is not down;
        (result, None), or (None, the error's first line)."""
        import tenacity

        if self.down and self.ending.is_set():  # the run is over and the store gone: tried once more
            if self.gave_up:
                return None, self.error or "the store does not answer"
            self.gave_up = True
        try:
            result = tenacity.Retrying(
                retry=tenacity.retry_if_exception(lambda e: transient(e) and self._retrying(e)),
                wait=backoff(),
                sleep=lambda seconds: self.ending.wait(seconds),  # close() cuts a wait short
                reraise=True,
            )(call)
        except Exception as e:  # noqa: BLE001 - kept in the folder; said once
            return None, first_line(e)
        if self.failing_since is not None:  # it truly answered: the outage is over
            kept = f"what it missed is kept in {self._folder()}" if self.unrecorded else "nothing was lost"
            log.warning(f"MLflow: {self.uri} answers again; {kept}")
            self.failing_since, self.down, self.gave_up = None, False, False
        return result, None

    def _retrying(self, error: BaseException) -> bool:
        """A try failed transiently: the first failure of an outage is said; True while the
        store is to be retried (retry_s since the outage began; at most END_WAIT_S past the end)."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
            log.warning(
                f"MLflow: {self.uri} does not answer ({first_line(error)}); training goes on, "
                f"what it does not take within {self.retry_s:.0f} s is kept in {self._folder()}"
            )
        limit = self.failing_since + self.retry_s
        if self.ended_at is not None:
            limit = min(limit, max(self.failing_since, self.ended_at) + END_WAIT_S)
        self.down = self.down or now >= limit
        return not self.down

    def _record(self, call: Callable[[], Any], what: str) -> str | None:
        """call() once the run is open; None when it was recorded, else why not."""
        return self._store(call, what)[1] if self.run_id else self.open_error or "the run is not open"

    def _write(self, metrics: list, params: list, tags: list) -> None:
        """Writes metrics, params and tags in batches; keeps what the store does not take."""
        from mlflow.entities import Metric, Param, RunTag

        for m, p, t in batches(metrics, params, tags):
            batch = {"metrics": [Metric(*x) for x in m], "params": [Param(*x) for x in p]}
            batch["tags"] = [RunTag(*x) for x in t]
            if error := self._record(lambda b=batch: self.client.log_batch(self.run_id, **b), "record"):
                lines = [{"param": key, "value": value} for key, value in p]
                lines += [{"tag": key, "value": value} for key, value in t]
                lines += [{"metric": k, "value": v, "step": s, "timestamp": ts} for k, v, ts, s in m]
                self.keep(lines, error, counted=True)

    def _log_files(self, folder: Path, what: str) -> None:
        """Logs the files under `folder`, then removes it; those the store does not take are
        copied to <run folder>/unrecorded_artifacts/."""
        try:
            if error := self._record(lambda: self.client.log_artifacts(self.run_id, str(folder)), what):
                if self.spill_path is not None:
                    shutil.copytree(folder, self.spill_path.parent / UNRECORDED_ARTIFACTS, dirs_exist_ok=True)
                self.kept_files = self.kept_files or self.keep([{"artifacts": UNRECORDED_ARTIFACTS}], error)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _end(self, end: dict[str, Any] | None) -> None:
        """Ends the run (or keeps its end for sync); then says in one line what was kept."""
        error = self.open_error or "the run is not open"
        if end is not None and self.run_id is not None and not self.taken_over:
            status, at = end["status"], end["end_time"]
            if self.unrecorded or self.kept_files:
                said = f"{self.unrecorded} metrics, params and tags" + " and files" * self.kept_files
                self._store(lambda: self.client.set_tag(self.run_id, "unrecorded", said), "tag the run")
            _, error = self._store(lambda: self.client.set_terminated(self.run_id, status, at), "end the run")
            if error is None:
                log.info(f"MLflow run {self.run_id} ended {status}")
        ended = end is not None and error is not None and not self.taken_over and self.keep([end], error)
        if not (self.unrecorded or self.kept_files or ended):
            return
        what = [f"{self.unrecorded} metrics, params and tags"] if self.unrecorded else []
        what = ", ".join(what + ["files"] * self.kept_files) + " and its end" * bool(ended)
        run = f"run {self.run_id}" if self.run_id else "the run (never opened)"
        folder = self._folder()
        where = f"kept in {folder}: `cifar-exp sync {folder}` records them" if self.spill_path else "lost"
        log.warning(f"MLflow: {self.uri} did not take {what.removeprefix(' and ')} of {run}; {where}")

    # ------------------------------------------------------------ the folder
    def _folder(self) -> str:
        return str(self.spill_path.parent) if self.spill_path else "no folder (they are lost)"

    def keep(self, lines: list[dict[str, Any]], error: str, counted: bool = False) -> bool:
        """Appends `lines` (each tagged with the run id) to spill_path, for `cifar-exp sync`;
        `counted`: they are metrics, params and tags. Returns whether they are there."""
        if not lines:
            return False
        if self.error is None and not self.failing:  # an outage was said as it began
            log.warning(f"MLflow: {self.uri} did not take a record ({error}); training goes on")
        self.error = self.error or error
        self.unrecorded += len(lines) if counted else 0
        if self.spill_path is None:
            return False
        try:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spill_path.open("a") as f:
                f.writelines(json.dumps({"run_id": self.run_id, **line}) + "\n" for line in lines)
        except OSError as e:
            log.error(f"MLflow: could not keep unrecorded records in {self.spill_path}: {e.strerror}")
            return False
        return True
