"""MLflow, one concern a module. It receives numbers and files; it never runs a model.

- store.py     where the store is, whether it can take a run, retries, and its health
- records.py   the background writer of metrics and params, and the spill file
- identity.py  what identifies a run: params, name, git state, config hash; finding earlier runs
- runs.py      a run's lifecycle: open (or reopen), record, end FINISHED/FAILED/KILLED
"""
