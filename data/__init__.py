"""flaxzoo data: tfds datasets in memory, and deterministic batching."""

from data.datasets import (MANUAL_DIR_ENV, DataError, Dataset, DatasetInfo, dataset_info,
                           default_data_dir, load_dataset, load_split, prepare, raw_files)
from data.folders import canonical_name
from data.pipeline import epoch_permutation, eval_batches, steps_per_epoch, train_batches

__all__ = ["MANUAL_DIR_ENV", "canonical_name", "DataError", "Dataset", "DatasetInfo", "dataset_info",
           "default_data_dir", "epoch_permutation", "eval_batches", "load_dataset", "load_split",
           "prepare", "raw_files", "steps_per_epoch", "train_batches"]
