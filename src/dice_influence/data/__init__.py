"""Datasets, node partitions, corruptions and seeded batch schedules (all offline).

Everything here is deterministic given its seeds. See :mod:`.datasets` (loaders),
:mod:`.partition` (who holds what) and :mod:`.nodes` (stacked per-node data, corruptions,
batch schedule).
"""

from .datasets import (
    CIFAR10_FOLDER,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CORRUPTION_KINDS,
    DATASETS,
    ENV_DATA_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    PARTITION_SCHEMES,
    SYSTEM_FASHION_MNIST_DIR,
    DataError,
    Dataset,
    dataset_files,
    load_dataset,
    parse_idx,
)
from .nodes import (
    BatchSchedule,
    Corruption,
    NodeData,
    gather_batch,
    make_node_data,
    node_test_splits,
    test_partition,
)
from .partition import partition

__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CORRUPTION_KINDS",
    "DATASETS",
    "ENV_DATA_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "PARTITION_SCHEMES",
    "SYSTEM_FASHION_MNIST_DIR",
    "BatchSchedule",
    "Corruption",
    "DataError",
    "Dataset",
    "dataset_files",
    "NodeData",
    "gather_batch",
    "load_dataset",
    "make_node_data",
    "node_test_splits",
    "test_partition",
    "parse_idx",
    "partition",
]
