"""The anchor (#14): the reference airbench94 (the `airbench` package, 0.1.8) and our
`experiment=airbench94`, in one go on one GPU and the same images: a warm-up run, then --seeds
runs of each; prints mean accuracy, spread and training seconds for both, with the GPU's name.

The same images: our image folder (DATA/train/<class>/*, DATA/test/<class>/*) is decoded by our
loader and written as airbench's `cifar10/train.pt` and `cifar10/test.pt` (dicts of uint8
N x 32 x 32 x 3 images, int64 labels and the class names, which its CifarLoader reads; it
downloads CIFAR-10 only when they are missing). The training set is shuffled first: airbench
whitens with its first 5000 images, and a folder loads sorted by class.

Seconds, both measured on the GPU: airbench's own `total_time_seconds` (CUDA events around its
whitening init and training steps; read before its final TTA evaluation is added); ours the sum
of `time/epoch_s` that each run recorded in MLflow (training steps only; our whitening init, a
few milliseconds, is outside). Accuracy: both after flip+shift TTA on the test folder.

Nothing is downloaded: the reference must be importable (the wrapper airbench_anchor_gpu.sh
unpacks the carried sdist onto PYTHONPATH), and our runs track into a local SQLite store.

usage:
  python benchmarks/airbench_anchor.py --data /tmp/cifar10-jpeg [--seeds 5] [--out DIR]
  python benchmarks/airbench_anchor.py --smoke [--out DIR]
      CPU, tiny generated data, one seed and a few steps of ours; the reference is skipped
      (it needs CUDA), its data files are still written and read back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cifar_exp.data import ImageData, load_imagefolder, load_synthetic  # noqa: E402

WARMUP_SEED = 100
# our loaders take the normalisation; the files for airbench hold raw pixels
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# Our variants: overrides on top of experiment=airbench94. "half" is airbench's own precision.
VARIANTS = {
    "airbench94": [],
    "airbench94_half": ["trainer.half=true", "trainer.autocast=false"],
}
# --smoke: a few CPU steps of a narrow network (200 images: 4 steps an epoch, 1.5 epochs)
SMOKE = [
    "device=cpu",
    "trainer.batch_size=50",
    "trainer.epochs=1.5",
    "trainer.test_batch_size=100",
    "model.block1=8",
    "model.block2=16",
    "model.block3=16",
]


@dataclass
class Result:
    seed: int
    acc: float  # test accuracy after TTA, a fraction
    train_s: float  # GPU seconds of training (see the module's docstring)


# ---------------------------------------------------------------- the reference's data files
def write_reference_data(data: ImageData, folder: Path, seed: int = 0) -> Path:
    """airbench's `folder/cifar10/{train,test}.pt` from `data`, the training set shuffled with
    `seed` (so its first 5000 images, airbench's whitening sample, mix the classes). Returns the
    folder airbench must run in: its test loader's path is always ./cifar10."""
    target = folder / "cifar10"
    target.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(seed))
    splits = {
        "train.pt": (data.train_images[order], data.train_labels[order]),
        "test.pt": (data.test_images, data.test_labels),
    }
    for name, (images, labels) in splits.items():
        torch.save(
            {
                "images": images.permute(0, 2, 3, 1).contiguous(),  # N x H x W x C, as CIFAR10.data
                "labels": labels.clone(),
                "classes": list(data.classes),
            },
            target / name,
        )
    first = data.train_labels[order][:5000].bincount(minlength=len(data.classes)).tolist()
    print(f"wrote {target}/train.pt and test.pt; classes among the first 5000 training images: {first}")
    return folder


def check_reference_data(folder: Path) -> None:
    """Reads the files back as airbench's CifarLoader does (with airbench itself if importable,
    on the CPU), so a wrong layout fails here rather than on the GPU."""
    try:
        from airbench import CifarLoader
    except ImportError:
        CifarLoader = None  # noqa: N806
    for train in (True, False):
        data = torch.load(folder / "cifar10" / ("train.pt" if train else "test.pt"), weights_only=True)
        images, labels = data["images"], data["labels"]
        assert images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3), images.shape
        assert labels.dtype == torch.int64 and len(labels) == len(images) and data["classes"]
        if CifarLoader is not None:
            loader = CifarLoader(str(folder / "cifar10"), train=train, batch_size=50, gpu="cpu")
            x, y = next(iter(loader))
            assert x.shape[1:] == (3, 32, 32) and len(x) == len(y)
    print("reference data read back" + (" by airbench's CifarLoader" if CifarLoader else ""))


# ---------------------------------------------------------------- the reference, in its own process
def reference_worker(folder: Path, seeds: list[int]) -> None:
    """Runs airbench.train94() with its defaults once per seed in `folder`, printing one JSON
    line per run. Its own process: importing airbench sets cudnn.benchmark globally."""
    os.chdir(folder)
    import airbench
    import airbench.utils

    entries: list[dict] = []

    def capture(variables: dict, is_final_entry: bool) -> None:  # instead of its table row
        entries.append({k: variables.get(k) for k in ("epoch", "total_time_seconds", "tta_val_acc")})

    airbench.utils.print_training_details = capture
    airbench.utils.print_columns = lambda *args, **kwargs: None
    for seed in seeds:
        entries.clear()
        torch.manual_seed(seed)
        airbench.train94(run=seed, verbose=True)  # verbose: it then records its times and TTA accuracy
        trained = [e for e in entries if isinstance(e["epoch"], int)][-1]
        final = entries[-1]
        result = Result(seed, final["tta_val_acc"], trained["total_time_seconds"])
        print("RESULT " + json.dumps(asdict(result)), flush=True)


def run_reference(folder: Path, seeds: list[int]) -> list[Result]:
    command = [sys.executable, __file__, "--reference-worker", str(folder), "--seed-list", *map(str, seeds)]
    results = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.append(Result(**json.loads(line[len("RESULT ") :])))
                r = results[-1]
                print(f"  reference seed {r.seed}: {100 * r.acc:.2f}% in {r.train_s:.3f} s", flush=True)
            else:
                print("  " + line, end="")
    if proc.returncode:
        raise SystemExit(f"the reference failed (exit {proc.returncode})")
    return results


# ---------------------------------------------------------------- ours, through the CLI
def run_ours(name: str, overrides: list[str], root: Path, out: Path, seeds: list[int]) -> list[Result]:
    """One sweep over `seeds` of experiment=airbench94 with tracking on (one process: the images
    are decoded once), into its own MLflow experiment; results read back from the store."""
    store = f"sqlite:///{out}/mlflow.db"
    command = [
        sys.executable,
        "-m",
        "cifar_exp",
        "experiment=airbench94",
        "dataset=imagefolder",
        f"dataset.root={root}",
        f"seed={','.join(map(str, seeds))}",
        f"mlflow.experiment_name=anchor_{name}",
        f"hydra.sweep.dir={out}/multirun/{name}",
        *overrides,
        "-m",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"ours ({name}) failed (exit {proc.returncode}); log: {out / name}.log")
    return read_sweep(store, f"anchor_{name}", name)


def read_sweep(store: str, experiment_name: str, name: str) -> list[Result]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(experiment_name)
    results = []
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        if "mlflow.parentRunId" not in run.data.tags:
            continue  # the sweep's parent run
        if run.info.status != "FINISHED":
            raise SystemExit(f"ours ({name}): run {run.info.run_id} ended {run.info.status}")
        seconds = sum(m.value for m in client.get_metric_history(run.info.run_id, "time/epoch_s"))
        results.append(Result(int(run.data.params["seed"]), run.data.metrics["test/acc"], seconds))
        r = results[-1]
        print(f"  {name} seed {r.seed}: {100 * r.acc:.2f}% in {r.train_s:.3f} s", flush=True)
    return results


# ---------------------------------------------------------------- the summary
def summary(results: dict[str, list[Result]], warmup: int | None) -> dict[str, dict]:
    """Per variant over the runs after the warm-up: accuracy in % (mean, sd, min, max) and
    training seconds (mean, sd); printed as a table, with ours against the targets of #14."""
    rows = {}
    for name, runs in results.items():
        acc = [100 * r.acc for r in runs if r.seed != warmup]
        secs = [r.train_s for r in runs if r.seed != warmup]
        sd = statistics.stdev if len(acc) > 1 else lambda values: 0.0
        rows[name] = dict(runs=len(acc), acc_mean=statistics.mean(acc), acc_sd=sd(acc), acc_min=min(acc))
        rows[name].update(acc_max=max(acc), train_s_mean=statistics.mean(secs), train_s_sd=sd(secs))
    print(f"\n{'':24s} runs  mean acc    sd     min     max   training s")
    for name, r in rows.items():
        print(
            f"{name:24s} {r['runs']:4d}  {r['acc_mean']:7.2f}%  {r['acc_sd']:4.2f}  {r['acc_min']:6.2f}  "
            f"{r['acc_max']:6.2f}  {r['train_s_mean']:6.3f} ± {r['train_s_sd']:.3f}"
        )
    reference = rows.get("reference")
    for name, r in rows.items():
        if reference and name != "reference":
            gap = r["acc_mean"] - reference["acc_mean"]
            ratio = r["train_s_mean"] / reference["train_s_mean"]
            print(
                f"{name}: accuracy {gap:+.2f} points vs the reference (target >= -0.20: "
                f"{'met' if gap >= -0.2 else 'NOT met'}); training time x{ratio:.2f} "
                f"(target <= 1: {'met' if ratio <= 1 else 'NOT met'})"
            )
    return rows


def smoke_images(folder: Path) -> Path:
    """A tiny image folder (PNG) of generated, learnable images."""
    from PIL import Image

    data = load_synthetic(
        train_size=200, test_size=100, noise=0.1, seed=0, root="", mean=CIFAR_MEAN, std=CIFAR_STD
    )
    for split, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            path = folder / split / data.classes[label] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="image folder with train/<class>/ and test/<class>/")
    parser.add_argument("--seeds", type=int, default=5, help="runs of each after the warm-up")
    parser.add_argument("--out", type=Path, help="where the data files, store and results go")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="ours: " + ", ".join(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny data, 1 seed, a few steps")
    parser.add_argument("--reference-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed-list", type=int, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_worker:
        return reference_worker(args.reference_worker, args.seed_list)
    if not args.smoke and (args.data is None or not torch.cuda.is_available()):
        parser.error("needs --data DIR and a CUDA GPU (--smoke runs on the CPU)")

    out = (args.out or Path(tempfile.mkdtemp(prefix="anchor-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        root, warmup, seeds, extra = smoke_images(out / "images"), None, [0], SMOKE
        gpu = "none (--smoke: CPU)"
    else:
        root, warmup, extra = args.data.resolve(), WARMUP_SEED, ["device=cuda"]
        seeds = [WARMUP_SEED, *range(args.seeds)]
        gpu = torch.cuda.get_device_name(0)
    data = load_imagefolder(root=str(root), mean=CIFAR_MEAN, std=CIFAR_STD, cache=True, cache_dir=None)
    print(
        f"GPU: {gpu}; torch {torch.__version__}; data {root}: {len(data.train_images)} training "
        f"and {len(data.test_images)} test images, {len(data.classes)} classes"
    )
    folder = write_reference_data(data, out / "reference")
    check_reference_data(folder)
    del data
    results: dict[str, list[Result]] = {}
    if args.smoke:
        print("reference: skipped (airbench 0.1.8 needs CUDA: .cuda() on its network, CUDA events)")
    else:
        print("reference (airbench 0.1.8, train94() with its defaults):", flush=True)
        results["reference"] = run_reference(folder, seeds)
    for name in args.variants.split(","):
        overrides = VARIANTS[name] + extra
        print(f"ours ({name}: experiment=airbench94 {' '.join(overrides)}):", flush=True)
        results[name] = run_ours(name, overrides, root, out, seeds)
    record = {"gpu": gpu, "torch": torch.__version__, "data": str(root), "warmup_seed": warmup}
    record["summary"] = summary(results, warmup)
    record["runs"] = {name: [asdict(r) for r in runs] for name, runs in results.items()}
    (out / "anchor.json").write_text(json.dumps(record, indent=1))
    print(f"results: {out / 'anchor.json'}")


if __name__ == "__main__":
    main()
