"""flaxzoo data: tfds datasets and image folders, in memory or streamed by index, and
deterministic batching."""

from flaxzoo.data.datasets import (
                                   MANUAL_DIR_ENV,
                                   dataset_info,
                                   default_data_dir,
                                   load_dataset,
                                   load_split,
                                   prepare,
                                   raw_files,
)
from flaxzoo.data.folders import canonical_name
from flaxzoo.data.pipeline import epoch_permutation, eval_batches, steps_per_epoch, train_batches
from flaxzoo.data.sources import (
                                  IN_MEMORY_MAX_BYTES,
                                  STREAMING_CHOICES,
                                  ArraySource,
                                  FolderFiles,
                                  TfdsRecords,
                                  as_source,
)
from flaxzoo.data.streaming import default_workers
from flaxzoo.data.types import DataError, Dataset, DatasetInfo

__all__ = ["MANUAL_DIR_ENV", "IN_MEMORY_MAX_BYTES", "STREAMING_CHOICES", "ArraySource", "FolderFiles",
           "TfdsRecords", "as_source", "canonical_name", "DataError", "Dataset", "DatasetInfo",
           "dataset_info", "default_data_dir", "default_workers", "epoch_permutation", "eval_batches",
           "load_dataset", "load_split", "prepare", "raw_files", "steps_per_epoch", "train_batches"]
