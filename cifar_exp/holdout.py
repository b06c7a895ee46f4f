"""The validation split: images held out of a dataset's training images, stratified by class and
drawn by a seed of their own, which every epoch is evaluated on and everything that chooses
reads (dataset.val_size, dataset.split_seed)."""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from cifar_exp.data import ImageData
from cifar_exp.errors import UserError


def val_count(val_size: float, n: int) -> int:
    """Images to hold out of `n`: `val_size` below 1 is a fraction of them (at least one image),
    1 or more a number of images, 0 none (as scikit-learn's test_size)."""
    if val_size <= 0:
        return 0
    if val_size < 1:
        return max(1, round(val_size * n))
    if val_size != int(val_size):
        raise UserError(
            f"dataset.val_size={val_size:g}: a fraction below 1 (0.1: a tenth of the training images) "
            "or a whole number of images"
        )
    return int(val_size)


def hold_out(data: ImageData, val_size: float, split_seed: int) -> ImageData:
    """`data` with a validation split taken out of its training images: stratified (each class
    gives its share, largest remainders first), drawn by `split_seed` alone, so every run of a
    sweep, whatever its `seed`, holds out the same images. The rest keep their order."""
    labels, n = data.train_labels, len(data.train_labels)
    count = val_count(val_size, n)
    if count == 0:
        return data
    if count >= n:
        raise UserError(
            f"dataset.val_size={val_size:g} holds out {count} of the {n} training images, leaving none "
            "to train on; hold out fewer (a fraction such as 0.1), or 0 for no validation split"
        )
    per_class = torch.bincount(labels, minlength=len(data.classes))
    exact = per_class.double() * count / n
    quota = exact.floor().long()
    remainder = count - int(quota.sum())
    order = torch.argsort(exact - quota, descending=True, stable=True)  # ties: the lower class first
    quota[order[:remainder]] += 1
    emptied = [data.classes[k] for k in range(len(per_class)) if per_class[k] and quota[k] >= per_class[k]]
    if emptied:
        raise UserError(
            f"dataset.val_size={val_size:g} holds out every training image of class {emptied[0]} "
            f"({int(per_class[data.classes.index(emptied[0])])} image(s)); hold out fewer"
        )
    generator = torch.Generator().manual_seed(split_seed)
    chosen = []
    for k in range(len(per_class)):
        members = torch.nonzero(labels == k).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[: int(quota[k])]])
    val_index = torch.cat(chosen).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_index] = False
    digest = hashlib.sha256(val_index.numpy().astype("<i8").tobytes()).hexdigest()[:16]
    split = {"val_images": str(count), "split_seed": str(split_seed), "val_index_sha256": digest}
    return dataclasses.replace(
        data,
        train_images=data.train_images[keep],
        train_labels=labels[keep],
        val_images=data.train_images[val_index],
        val_labels=labels[val_index],
        split=split,
    )
