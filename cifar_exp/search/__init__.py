"""Hyperparameter search on Optuna: the Hydra sweeper (`hydra/sweeper=optuna`) that asks the study
for trials and launches them as they free up, the job's side that reports each epoch and stops a
trial the pruner gives up on, the study itself (storage, name, lock, sampler, pruner), and what a
search leaves on its parent run besides the sweep's table (outcome.py)."""
