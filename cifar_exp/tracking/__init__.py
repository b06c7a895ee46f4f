"""MLflow, one concern a module. It receives numbers and files; it never runs a model.

- store.py     where the store is, whether it can take a run, retries
- records.py   the run's handle: the background writer of every store call, and the spill file
- leases.py    one writer per run (a lease tag with a heartbeat); closing runs whose process died
- identity.py  what identifies a run: params, git state, config hash; finding earlier runs
- runs.py      a run's lifecycle: open (or reopen), record, end FINISHED/FAILED/KILLED
- resumption.py  whether a run may continue, checked before anything is written
- sync.py      `cifar-exp sync`: what an outage left in a run's folder, recorded afterwards
"""
