"""Datasets held in memory as tensors, and their partitions over devices."""

from amble.data.dataset import Dataset
from amble.data.idx import find_idx_root, read_idx, write_idx
from amble.data.loading import DATASET_NAMES, load_dataset
from amble.data.partition import PARTITION_KINDS, partition_indices, split_for
from amble.data.synthetic import make_synthetic

__all__ = [
    "DATASET_NAMES",
    "PARTITION_KINDS",
    "Dataset",
    "find_idx_root",
    "load_dataset",
    "make_synthetic",
    "partition_indices",
    "read_idx",
    "split_for",
    "write_idx",
]
