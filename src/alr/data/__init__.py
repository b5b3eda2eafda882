"""Data sets. Each module has ``build(batch_size, device, seed, **options) -> DataBundle``."""

from alr.data.batches import Batch, Batches, DataBundle, TensorBatches

__all__ = ["Batch", "Batches", "DataBundle", "TensorBatches"]
