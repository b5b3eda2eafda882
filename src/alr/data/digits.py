"""scikit-learn's handwritten digits: the embedded default (real data, nothing downloaded).

1,797 real 8×8 grey-level images (values 0–16) of the digits 0–9, shipped inside scikit-learn.
Split 80/20, stratified, with a fixed seed (docs/deviations.md#data); standardised with the training split's
mean and standard deviation.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from alr.data.batches import DataBundle, TensorBatches


def load_split(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[np.ndarray, ...]:
    """``x_train, x_test, y_train, y_test`` as float32 ``N×1×8×8`` images and int64 labels."""
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)


def build(
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    eval_batch_size: int = 512,
) -> DataBundle:
    x_tr, x_te, y_tr, y_te = load_split(test_fraction, split_seed)
    mean, std = x_tr.mean(), x_tr.std()
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    x_tr, x_te = as_tensor((x_tr - mean) / std), as_tensor((x_te - mean) / std)
    return DataBundle(
        train=TensorBatches(x_tr, as_tensor(y_tr), batch_size, shuffle=True, seed=seed),
        test=TensorBatches(x_te, as_tensor(y_te), eval_batch_size, shuffle=False),
        num_classes=10,
        class_names=[str(d) for d in range(10)],
    )
