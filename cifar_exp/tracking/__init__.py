"""MLflow, one concern a module. It receives numbers and files; it never runs a model.

- store.py     where the store is, whether it can take a run, retries
- records.py   the background writer of every store call of a run, and the spill file
- leases.py    one writer per run (a lease tag with a heartbeat); closing runs whose process died
- identity.py  what identifies a run: params, name, git state, config hash; finding earlier runs
- runs.py      a run's lifecycle: open (or reopen), record, end FINISHED/FAILED/KILLED
"""
