"""Data modules. Each exposes `num_classes` (0 = regression) and `input_shape`, which the CLI links
into the model, and splits its data across ranks itself (see deepres.data.base)."""

from deepres.data.base import DeepresDataModule
from deepres.data.cifar import CIFARDataModule
from deepres.data.digits import DigitsDataModule
from deepres.data.sequence import SequenceDataModule
from deepres.data.synthetic import SyntheticDataModule

__all__ = ["CIFARDataModule", "DeepresDataModule", "DigitsDataModule", "SequenceDataModule", "SyntheticDataModule"]
