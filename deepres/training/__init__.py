"""Lightning glue: modules, CLI, run directories. Models stay in deepres.models."""

from deepres.training.module import Classifier, DeepresModule, SequenceModule

__all__ = ["Classifier", "DeepresModule", "SequenceModule"]
