"""Training: one Trainer for every family, tasks, recipes (the one place a model is built from
its recipe), torchrun."""

from tformer.training.settings import SampleSpec, TaskSettings, TokenizerSpec, TrainConfig
from tformer.training.tasks import Batch, CausalLMTask, Task, causal_lm_loss
from tformer.training.trainer import Trainer, TrainingError, TrainResult

__all__ = ["Batch", "CausalLMTask", "SampleSpec", "TaskSettings", "Task", "TokenizerSpec", "TrainConfig",
           "TrainResult", "Trainer", "TrainingError", "causal_lm_loss"]
