"""Tasks bind data to a model and a loss. One module per task (see `base` for what each defines);
`TASK_MODULES` maps a recipe's `task:` to its module (imported on first use)."""

from tformer.training.tasks.base import Batch, Task, TaskData
from tformer.training.tasks.causal_lm import CausalLMTask, causal_lm_loss

TASK_MODULES = {
    "causal_lm": "tformer.training.tasks.causal_lm",
    "masked_lm": "tformer.training.tasks.masked_lm",
    "classification": "tformer.training.tasks.classification",
    "segment_lm": "tformer.training.tasks.segment_lm",
    "seq2seq": "tformer.training.tasks.seq2seq",
    "image_classification": "tformer.training.tasks.image_classification",
    "image_generation": "tformer.training.tasks.image_generation",
}

__all__ = ["TASK_MODULES", "Batch", "CausalLMTask", "Task", "TaskData", "causal_lm_loss"]
