"""Lightning glue: modules, their hyper-parameter groups, CLI, run directories. Models stay in deepres.models."""

from deepres.training.config import MemoryConfig, OptimizerConfig, ScheduleConfig
from deepres.training.module import Classifier, DeepresModule, SequenceModule

__all__ = ["Classifier", "DeepresModule", "MemoryConfig", "OptimizerConfig", "ScheduleConfig", "SequenceModule"]
