"""Who writes a run: a lease in the store (the run's `lease` tag: the owner's host:pid, a token and
an expiry that the record writer's heartbeat pushes on), so that one process at a time continues a
run, on this host or on another sharing the store. And closing the runs whose owner died without
ending them (killed before their first checkpoint, say): KILLED, with the reason in their `error`
tag, by the next command that touches them or by `cifar-exp sync --stale`."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cifar_exp.errors import UserError, first_line

log = logging.getLogger(__name__)

LEASE_TAG = "lease"
LEASE_S = 300.0  # a lease not renewed for this long has lost its owner (dead, or cut off)
HEARTBEAT_S = 60.0  # how often the record writer renews it
SETTLE_S = 1.0  # between writing a lease and reading it back: a rival's write lands in between
STALE = "its process"  # how the error tag of a run closed as stale begins
INTERRUPTED_TAGS = ("error",)  # what an interruption left on a run; resumed to FINISHED, it goes


class TakenOver(UserError):
    """Another process holds the run's lease now: this one stops and writes nothing more to it."""


@dataclass
class Lease:
    owner: str  # host:pid
    token: str
    expires: float  # time.time() after which the lease is free

    @classmethod
    def of(cls, tags: dict[str, str]) -> Lease | None:
        try:
            return cls(**json.loads(tags[LEASE_TAG]))
        except (KeyError, TypeError, ValueError):
            return None

    def tag(self, expires: float | None = None) -> dict[str, str]:
        """The tag; with `expires`, renewed (or with time.time(), released) until then."""
        self.expires = self.expires if expires is None else expires
        return {LEASE_TAG: json.dumps(asdict(self))}

    def alive(self) -> bool:
        """Held by a process that still runs: renewed within LEASE_S, and on this host its pid
        alive (a process killed on this host frees its lease at once)."""
        host, _, pid = self.owner.rpartition(":")
        if time.time() > self.expires:
            return False
        return host != socket.gethostname() or not pid.isdigit() or process_alive(int(pid))


def new_lease() -> Lease:
    return Lease(f"{socket.gethostname()}:{os.getpid()}", uuid.uuid4().hex, time.time() + LEASE_S)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs on this host; one that exited but was not yet waited for does not."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's


def refuse_if_held(run_id: str, tags: dict[str, str], mine: Lease | None = None) -> None:
    """One line (UserError) when another process that still runs holds the run's lease."""
    held = Lease.of(tags)
    if held is None or (mine and held.token == mine.token) or (not mine and not held.alive()):
        return
    until = time.strftime("%H:%M:%S", time.localtime(held.expires))
    raise UserError(
        f"run {run_id} is being continued by process {held.owner} (its lease runs until {until} "
        "unless renewed): one writer per run, nothing was changed"
    )


def take(client: Any, run_id: str) -> Lease:
    """Takes the run's lease for this process, or refuses in one line. Written, then read back
    after SETTLE_S: of two processes taking it at once, the one whose write landed last holds it."""
    from cifar_exp.tracking.store import retrying  # a busy SQLite file ("database is locked") waits

    def tags() -> dict[str, str]:
        return retrying(lambda: client.get_run(run_id), "reading the run's lease").data.tags

    refuse_if_held(run_id, tags())
    lease = new_lease()

    def write() -> None:
        retrying(lambda: client.set_tag(run_id, LEASE_TAG, lease.tag()[LEASE_TAG]), "writing the run's lease")

    try:
        write()
    except Exception as e:  # SQLite: another process inserted the tag at the same moment
        if "UNIQUE constraint" not in str(e):
            raise
    time.sleep(SETTLE_S)
    refuse_if_held(run_id, tags(), lease)  # the other's lease, if its write is the one that landed
    write()  # ours landed, or (a race lost to a writer that is gone) none did: ours now
    return lease


def heartbeat(lease: Lease) -> Callable[[Any, str], str | None]:
    """The record writer's heartbeat: renews `lease`; returns who holds the run instead, if
    someone took it over (its lease expired while the store did not answer, say)."""

    def renew(client: Any, run_id: str) -> str | None:
        held = Lease.of(client.get_run(run_id).data.tags)
        if held is not None and held.token != lease.token:
            return held.owner
        client.set_tag(run_id, LEASE_TAG, lease.tag(time.time() + LEASE_S)[LEASE_TAG])
        return None

    return renew


def close_stale(client: Any, experiment_ids: list[str], where: str = "") -> list[str]:
    """Ends KILLED each RUNNING run (matching the filter `where`) whose lease has lost its owner,
    at its last heartbeat, with the reason in its `error` tag; returns one line for each."""
    from mlflow.entities import RunTag

    running = " and ".join(filter(None, ["attributes.status = 'RUNNING'", where]))
    found = client.search_runs(experiment_ids, running, max_results=1000)
    said = []
    for run in found:
        lease = Lease.of(run.data.tags)
        if lease is None or lease.alive():
            continue
        run_id, now = run.info.run_id, time.time()
        last_heartbeat = max(run.info.start_time, int((min(now, lease.expires) - LEASE_S) * 1000))
        why = f"{STALE} {lease.owner} stopped without ending it (killed, or cut off from the store)"
        released = [RunTag(key, value) for key, value in lease.tag(now).items()]
        client.log_batch(run_id, tags=[RunTag("error", why), *released])
        client.set_terminated(run_id, "KILLED", last_heartbeat)
        said.append(f"closed run {run_id} ({run.info.run_name}) as KILLED: {why}")
    return said


def closed_as_stale(run: Any) -> bool:
    return run.info.status == "KILLED" and run.data.tags.get("error", "").startswith(STALE)


def close_stale_in(uri: str) -> None:
    """What commands that read the store do first: close its dead runs, one line each on stderr.
    A store that is not there or does not answer is left for the command itself to say."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return
    try:
        client = MlflowClient(uri)
        said = close_stale(client, [e.experiment_id for e in client.search_experiments()])
    except Exception as e:  # noqa: BLE001 - the command that follows says what is wrong
        log.debug(f"stale runs not looked for: {first_line(e)}")
        return
    for line in said:
        print(line, file=sys.stderr)
