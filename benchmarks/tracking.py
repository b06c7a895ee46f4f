"""What MLflow tracking costs a training run, measured in one process against a temporary SQLite
store (absolute times on a shared machine are noisy; each figure is compared with a baseline
measured in the same process, alternating, and medians are reported).

  A. `experiment=tutorial dataset=synthetic` (batch 4, one epoch of --images training images:
     ~10 s a run for 20000 on 2 CPU cores): wall time with mlflow.enabled=true over
     mlflow.enabled=false, the dataset generated beforehand. Target: ratio <= 1.03.
  B. Per-job overhead in a sweep: a tiny job (200 images, batch 32, one epoch) with tracking on
     minus the same job with tracking off, after one tracked warm-up job (so imports and the
     store's set-up are paid once, as in a sweep). Target: < 1 s. Measured three ways: a plain
     job, a sweep job (run with a parent run's JobContext, as the sweep callback hands it), and a
     plain job with the figures replaced by 1-pixel images (where the time goes).
  Also printed: the one-off cost of importing what tracking imports (mlflow, the figure code),
  timed in fresh subprocesses, and a breakdown of one tracked tiny job's tracking steps.

Configs are composed with Hydra's compose API and `cifar_exp.run.run(cfg)` is called directly.
Outside @hydra.main HydraConfig is unset (tracking then skips the overrides tag and the .hydra
snapshot), so each job sets it and writes the snapshot the way Hydra's run_job does, to measure
what a real job logs.

usage: python benchmarks/tracking.py [--images 20000] [--repeats 3] [--tiny-repeats 5]
       (about 2.5 minutes on 2 cores; the temporary store is removed at exit)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = ["experiment=tutorial", "dataset=synthetic", "trainer.epochs=1", "device=cpu"]
TINY = [
    "dataset=synthetic",
    "dataset.train_size=200",
    "dataset.test_size=100",
    "trainer.epochs=1",
    "trainer.batch_size=32",
    "device.threads=1",  # one torch thread: no spinning OpenMP threads fighting the other load
    "device=cpu",
]


def hydra_job(overrides: list[str], output_dir: Path) -> Any:
    """The job config a `python -m cifar_exp` job would get: composed with Hydra's compose API,
    HydraConfig set and the .hydra snapshot written to output_dir (what Hydra's run_job does),
    so tracking records overrides and the snapshot as it does in a real run."""
    import copy

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    from cifar_exp.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    snapshot = output_dir / ".hydra"
    snapshot.mkdir(parents=True)
    OmegaConf.save(task, snapshot / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": cfg.hydra}), snapshot / "hydra.yaml")
    OmegaConf.save(cfg.hydra.overrides.task, snapshot / "overrides.yaml")
    return task


JOBS = 0  # output folders made so far
EPOCH_SECONDS: dict[bool, list[float]] = {True: [], False: []}  # by tracking on/off


def timed_run(overrides: list[str], tracking: bool, job: Any = None) -> float:
    """Seconds of one cifar_exp.run.run(cfg), its printed report swallowed. The training loop's
    own time of its last epoch (the time/epoch_s metric) goes to EPOCH_SECONDS[tracking]; `job`: the
    JobContext of a sweep's job."""
    from cifar_exp.run import run

    global JOBS
    JOBS += 1
    output_dir = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent / f"job_{JOBS}"
    cfg = hydra_job([*overrides, f"mlflow.enabled={str(tracking).lower()}"], output_dir)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = run(cfg, None, job)
    seconds = time.perf_counter() - started
    EPOCH_SECONDS[tracking].append(metrics.get("time/epoch_s", float("nan")))
    return seconds


def preload(overrides: list[str]) -> None:
    """Generates the dataset into run.load_data's per-process cache, as a sweep's first job would."""
    from omegaconf import OmegaConf

    from cifar_exp.run import load_data

    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent
    load_data(OmegaConf.to_yaml(hydra_job(overrides, Path(tempfile.mkdtemp(dir=store))).dataset))


def alternate(overrides: list[str], repeats: int, context: Callable[[], Any] = contextlib.nullcontext):
    """(on times, off times), alternating on/off so drifting machine load hits both alike."""
    on, off = [], []
    for i in range(repeats):
        for tracking in (True, False) if i % 2 == 0 else (False, True):
            if tracking:
                with context() as job:
                    on.append(timed_run(overrides, True, job))
            else:
                off.append(timed_run(overrides, False))
    return on, off


@contextlib.contextmanager
def sweep_parent() -> Iterator[Any]:
    """A parent run, and the JobContext the sweep callback hands a job of it."""
    from mlflow.tracking import MlflowClient

    from cifar_exp.config import TrackingConfig
    from cifar_exp.tracking import identity, store

    config = TrackingConfig()
    client = MlflowClient(store.tracking_uri(config))
    parent = client.create_run(store.ensure_experiment(config), run_name="sweep:benchmark")
    try:
        yield identity.JobContext(parent.info.run_id)
    finally:
        client.set_terminated(parent.info.run_id, "FINISHED")


@contextlib.contextmanager
def tiny_figures() -> Iterator[None]:
    """The figure functions of cifar_exp.reports replaced by ones returning a 1-pixel image: what
    the job would cost if drawing the figures were free (they are still logged)."""
    from PIL import Image

    from cifar_exp import reports

    saved = {name: getattr(reports, name) for name in ("image_grid", "confusion_image")}
    for name in saved:
        setattr(reports, name, lambda *args, **kwargs: Image.new("RGB", (1, 1)))
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(reports, name, function)


def import_seconds(repeats: int = 3) -> float:
    """Median seconds to import what a tracked run imports on top of an untracked one, each in a
    fresh interpreter that has already imported the runner."""
    code = (
        "import time, cifar_exp.run; t = time.perf_counter(); "
        "import mlflow, mlflow.tracking; from cifar_exp import reports; import PIL.ImageDraw; "
        "print(time.perf_counter() - t)"
    )
    times = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(repeats)
    ]
    return statistics.median(times)


def breakdown(overrides: list[str]) -> dict[str, float]:
    """Seconds spent in each tracking function during one tracked job (wrapped, not sampled)."""
    import mlflow

    from cifar_exp import reports, run
    from cifar_exp.tracking import records, runs

    spent: dict[str, float] = {}
    targets = [
        (runs, "ensure_experiment"),
        (runs, "git_state"),
        (mlflow, "start_run"),
        (runs, "snapshot_files"),
        (reports, "sample_files"),
        (run, "result_files"),
        (records.RecordWriter, "log_files"),
        (reports, "image_grid"),
        (reports, "confusion_image"),
        (runs, "_end"),
        (records.RecordWriter, "close"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]

    def wrap(name: str, function: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started

        return wrapper

    for owner, name, function in saved:
        setattr(owner, name, wrap(name, function))
    try:
        spent["whole job"] = timed_run(overrides, True)
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)
    return spent


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="training images for A (batch 4)")
    parser.add_argument("--repeats", type=int, default=3, help="A: runs with tracking on, and off")
    parser.add_argument("--tiny-repeats", type=int, default=5, help="B: tiny jobs on, and off")
    args = parser.parse_args()

    store = tempfile.mkdtemp(prefix="tracking_benchmark_")  # removed at the end
    atexit.register(shutil.rmtree, store, ignore_errors=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    for key in [k for k in os.environ if k.startswith("CIFAR_EXP_")]:
        del os.environ[key]
    print(f"store: {store}")

    imports = import_seconds()
    started = time.perf_counter()
    timed_run(TINY, True)  # warm-up: imports, the store's tables, the synthetic data
    print(
        f"warm-up: first tracked tiny job {time.perf_counter() - started:.2f} s "
        f"(one-off imports of tracking: {imports:.2f} s, measured in fresh interpreters)"
    )

    # B first: its jobs are short, so machine load drifts less across them.
    tiny_on, tiny_off = alternate(TINY, args.tiny_repeats)
    sweep_on, sweep_off = alternate(TINY, args.tiny_repeats, sweep_parent)
    bare_on, bare_off = alternate(TINY, args.tiny_repeats, tiny_figures)
    overhead = statistics.median(tiny_on) - statistics.median(tiny_off)
    sweep_overhead = statistics.median(sweep_on) - statistics.median(sweep_off)
    bare_overhead = statistics.median(bare_on) - statistics.median(bare_off)
    print(
        "\nB. per-job overhead, tiny job (median of "
        f"{args.tiny_repeats}; tracking off: {statistics.median(tiny_off):.3f} s)"
    )
    print(
        f"   plain job:             {overhead:+.3f} s  "
        f"(on {statistics.median(tiny_on):.3f} s, off {statistics.median(tiny_off):.3f} s)"
    )
    print(
        f"   sweep job (parent id): {sweep_overhead:+.3f} s  "
        f"(on {statistics.median(sweep_on):.3f} s, off {statistics.median(sweep_off):.3f} s)"
    )
    print(
        f"   figures 1 pixel:       {bare_overhead:+.3f} s  "
        f"(on {statistics.median(bare_on):.3f} s, off {statistics.median(bare_off):.3f} s)"
    )
    print(f"   target < 1 s: {verdict(max(overhead, sweep_overhead) < 1.0)}")
    print("   where one tracked tiny job spends its time (s, nested calls counted in both):")
    for name, seconds in breakdown(TINY).items():
        print(f"     {name:<20s} {seconds:.3f}")

    tutorial = [*TUTORIAL, f"dataset.train_size={args.images}"]
    preload(tutorial)  # else the first run, tracked, would also generate the images
    for times in EPOCH_SECONDS.values():
        times.clear()
    on, off = alternate(tutorial, args.repeats)
    ratio = statistics.median(on) / statistics.median(off)
    print(f"\nA. tutorial, batch 4, {args.images} images, 1 epoch (median of {args.repeats})")
    print(f"   tracking on {statistics.median(on):.2f} s ({', '.join(f'{t:.2f}' for t in on)})")
    print(f"   tracking off {statistics.median(off):.2f} s ({', '.join(f'{t:.2f}' for t in off)})")
    print(f"   ratio {ratio:.4f}  target <= 1.03: {verdict(ratio <= 1.03)}")
    epoch_on, epoch_off = (statistics.median(EPOCH_SECONDS[t]) for t in (True, False))
    print(
        f"   the training loop alone (time/epoch_s): on {epoch_on:.2f} s, off {epoch_off:.2f} s, "
        f"ratio {epoch_on / epoch_off:.4f}; the rest is per-run set-up and artifacts"
    )
    once = statistics.median(on) - statistics.median(off) + imports
    tutorial_s = statistics.median(off) * 2 * 50000 / args.images  # 2 epochs of CIFAR-10, roughly
    print(
        f"   a fresh `python -m cifar_exp` also imports mlflow and the figure code: +{once:.2f} s in "
        f"all, {once / statistics.median(off):.1%} of this run, ~{once / tutorial_s:.1%} of the real "
        f"tutorial (2 epochs of 50000 images, ~{tutorial_s:.0f} s at this speed)"
    )


if __name__ == "__main__":
    main()
