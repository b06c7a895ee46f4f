"""What the terminal shows besides our own lines. Our log lines are Hydra's (conf/config.yaml,
hydra.job_logging) and print above the epoch's progress bar (train.Loop.fit); MLflow's start-up
chatter is kept off the terminal here, before MLflow is first imported."""

from __future__ import annotations

import os


def quiet_mlflow() -> None:
    """MLflow's INFO lines and run links off the terminal, for this process and the jobs it
    starts, unless the environment sets them (MLFLOW_LOGGING_LEVEL=INFO shows them again)."""
    # MLflow configures its own loggers (and alembic's) when first imported, at the level in
    # MLFLOW_LOGGING_LEVEL, so Hydra's logging config cannot quiet them: WARNING hides "Creating
    # initial MLflow database tables...", "Updating database tables" and the like, and keeps its
    # warnings. On a tracking server, ending a run prints "🏃 View run ... at: URL" unless suppressed.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
