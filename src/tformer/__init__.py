"""tformer: one set of components for the whole life of Transformer models."""

__version__ = "0.1.0"


def pipeline(run_dir: str, checkpoint: str = "best"):  # noqa: ANN201 - a tformer.inference.pipeline.Pipeline
    """Open a trained run for prediction: `tformer.pipeline("runs/x").classify([...])` (see
    `tformer.inference.pipeline`)."""
    from tformer.inference.pipeline import pipeline as open_pipeline

    return open_pipeline(run_dir, checkpoint)
