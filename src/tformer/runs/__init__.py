"""Run directories: the checkpoint format and opening a run into model, tokenizer, record and
capabilities. Sits below inference and training, so using a model never imports the Trainer."""

from tformer.runs.checkpoint import CheckpointError
from tformer.runs.run import Run, find_checkpoint, open_run

__all__ = ["CheckpointError", "Run", "find_checkpoint", "open_run"]
