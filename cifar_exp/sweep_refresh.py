"""A sweep's summary kept true after the sweep: a child resumed and trained further (`cifar-exp
resume CHILD trainer.epochs=4`) or finished after it was stopped changes the sweep's best, table and
plot, so the ended sweeps that hold it are summarised again (sweep_summary.summarise)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from cifar_exp.config import TrackingConfig
from cifar_exp.errors import first_line
from cifar_exp.sweep_summary import summarise
from cifar_exp.tracking import identity, store

log = logging.getLogger(__name__)


@contextlib.contextmanager
def refreshed_after(cfg: TrackingConfig, run_id: str | None) -> Iterator[None]:
    """Around the training of `run_id`, an existing run continued (resume): once it has ended, however
    it ended, the ended sweeps that hold it get their summary again (refresh). A new run needs
    none: it belongs to no sweep, or to a running one that summarises when it ends."""
    try:
        yield
    finally:
        if run_id and cfg.enabled:
            from mlflow.tracking import MlflowClient

            refresh(MlflowClient(store.tracking_uri(cfg)), run_id)


def refresh(client: Any, run_id: str) -> list[str]:
    """Summarises again (summarise: table, plot, best, description, status) each ended sweep that
    holds `run_id`, its parent or a later sweep that linked it, so they never name a stale best;
    returns their ids. A store that fails costs one warning: the run's own result stands, and
    `cifar-exp compare` reads the children live."""
    try:
        run = client.get_run(run_id)
        linking = f"tags.`{identity.LINK_PREFIX}{run_id}` != ''"
        linked = client.search_runs([run.info.experiment_id], linking, max_results=1000)
        parents = [run.data.tags.get("mlflow.parentRunId"), *(p.info.run_id for p in linked)]
        refreshed = []
        for parent in [client.get_run(p) for p in dict.fromkeys(parents) if p]:
            if parent.info.status == "RUNNING":  # its sweep is on: it summarises when it ends
                continue
            status, _ = summarise(client, parent.info.run_id, search="search/metric" in parent.data.tags)
            if status != parent.info.status:  # e.g. a KILLED child resumed to FINISHED
                client.update_run(parent.info.run_id, status=status)  # keeps the sweep's end time
            refreshed.append(parent.info.run_id)
            log.info(f"MLflow: {parent.info.run_name} ({parent.info.run_id}) summarised again")
        return refreshed
    except Exception as e:  # noqa: BLE001 - the run ended already; its sweep's summary is a view
        log.warning(f"MLflow: could not refresh the summary of run {run_id}'s sweep ({first_line(e)})")
        return []
