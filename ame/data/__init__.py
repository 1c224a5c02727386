"""Stages 1-2: datasets as uint8 tensors and shard splitting (the corrupted test sets are stage 5: :mod:`ame.eval`)."""
from ame.data.datasets import ImageData, load_cifar, load_digits
from ame.data.landmarks import load_gld23k
from ame.data.shards import Split, split

__all__ = ["ImageData", "load_cifar", "load_digits", "load_gld23k", "Split", "split"]
