"""Data sets. Each module has ``build(batch_size, device, seed, **options) -> DataBundle``."""

from alr.data.batches import Batches, DataBundle, TensorBatches

__all__ = ["Batches", "DataBundle", "TensorBatches"]
