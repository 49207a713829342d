"""Metrics that judge a model's outputs independently of the model: numpy / scikit-learn only."""

from tformer.metrics.classification import classification_metrics, plot_confusion
from tformer.metrics.images import ImageJudge, frechet_distance, per_pixel_baseline

__all__ = ["ImageJudge", "classification_metrics", "frechet_distance", "per_pixel_baseline", "plot_confusion"]
