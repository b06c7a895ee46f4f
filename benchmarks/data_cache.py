"""Loading an image folder in a fresh process, first and second time: the first decodes every
image and writes the decoded-tensor cache (cold), the second reads the cache (warm). Both in this
run, on this machine, into a new cache folder (the user's cache is left alone). Also times the
part every warm load repeats: listing and stat-ing every file for the cache key. Target (issue 9):
a warm load in 1 s or less.

usage: python benchmarks/data_cache.py [--root /tmp/cifar10-jpeg] [--warm 3]
       (root: CIFAR-10 images as train/<class>/ and test/<class>/, 50,000 JPEGs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py: a script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent

# One load in a fresh interpreter; times only the loader, not Python's and torch's start-up.
CHILD = """
import json, sys, time
from cifar_exp import data, decoded_cache, image_files
root, cache_dir = sys.argv[1], sys.argv[2]
started = time.perf_counter()
loaded = data.load_imagefolder(root=root, mean=[0.5] * 3, std=[0.5] * 3, cache=True, cache_dir=cache_dir)
load_s = time.perf_counter() - started
started = time.perf_counter()
listed = [image_files.list_split(data.Path(root), split).classes for split in ("train", "test")]
files = [f for split in listed for name in loaded.classes for f in split[name]]
decoded_cache.Source("imagefolder", data.Path(root), files, "").key()
key_s = time.perf_counter() - started
images = len(loaded.train_images) + len(loaded.test_images)
print(json.dumps({"load_s": load_s, "key_s": key_s, "images": images}))
"""


def load_in_fresh_process(root: str, cache_dir: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    out = subprocess.run(
        [sys.executable, "-c", CHILD, root, cache_dir], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="/tmp/cifar10-jpeg")
    parser.add_argument("--warm", type=int, default=3, help="warm loads, each in a fresh process")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="cifar_exp-cache-bench-") as cache_dir:
        cold = load_in_fresh_process(args.root, cache_dir)
        warm = [load_in_fresh_process(args.root, cache_dir) for _ in range(args.warm)]
        size = sum(f.stat().st_size for f in Path(cache_dir).iterdir())
    warm_each = [w["load_s"] for w in warm]
    warm_s = statistics.median(warm_each)
    print(f"{args.root}: {cold['images']:,} images; CPU: {cpu_name()}, {cores} cores")
    print(f"cold load (decode + write cache): {cold['load_s']:6.2f} s")
    print(f"warm load (read cache), median:   {warm_s:6.2f} s   ({', '.join(f'{s:.2f}' for s in warm_each)})")
    key_s = statistics.median(w["key_s"] for w in warm)
    print(f"  of which listing + stat of every file (the key): about {key_s:.2f} s")
    print(f"cold / warm: {cold['load_s'] / warm_s:.0f}x; cache file {size / 1e6:,.0f} MB")


if __name__ == "__main__":
    main()
