"""Random images made on the training device: for measuring training speed, never for accuracy.

``make gpu-check`` times the suite's own trainer on this data so that no data set has to be on the
machine. The images are random ``uint8`` pixels of the chosen size, made once on the device, and
each training batch goes through the CIFAR loader's on-device augmentation (random crop with
4 pixels of zero padding, horizontal flip, normalisation): at 32×32 a step costs what a CIFAR step
costs. At 224×224 that augmentation stands in for ImageNet's (DALI decodes and crops JPEGs on the
GPU), whose cost is not measured here. Labels are uniform over ``num_classes``.
"""

from __future__ import annotations

import torch

from alr.data.batches import DataBundle, TensorBatches
from alr.data.cifar import CropFlipNormalize, Normalize

# Mid-grey statistics of uniform uint8 pixels: normalised inputs then have mean 0 and deviation 1.
MEAN, STD = (0.5, 0.5, 0.5), (0.2887, 0.2887, 0.2887)


def build(
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    num_classes: int = 10,
    image_size: int = 32,
    n_train: int = 1024,
    n_test: int = 1000,
    eval_batch_size: int = 1000,
) -> DataBundle:
    """``n_train`` training and ``n_test`` test images of ``3×image_size×image_size`` on ``device``."""
    if min(n_train, n_test, image_size, num_classes) < 1:
        raise ValueError(
            f"synthetic data needs n_train, n_test, image_size and num_classes >= 1, got "
            f"{n_train}, {n_test}, {image_size}, {num_classes}"
        )
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        shape = (n, 3, image_size, image_size)
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, num_classes, (n,), device=device, generator=g)

    normalize = Normalize(MEAN, STD, device)
    return DataBundle(
        train=TensorBatches(
            images(n_train),
            labels(n_train),
            batch_size,
            shuffle=True,
            seed=seed,
            transform=CropFlipNormalize(normalize, size=image_size),
        ),
        test=TensorBatches(images(n_test), labels(n_test), eval_batch_size, shuffle=False, transform=normalize),
        num_classes=num_classes,
        class_names=[f"class {k}" for k in range(num_classes)],
    )
