"""Training: one Trainer for every family, Tasks, checkpoints, recipes, torchrun."""

from tformer.training.tasks import CausalLMTask, Task, causal_lm_loss
from tformer.training.trainer import TrainConfig, Trainer, TrainingError, TrainResult

__all__ = ["CausalLMTask", "Task", "TrainConfig", "TrainResult", "Trainer", "TrainingError",
           "causal_lm_loss"]
