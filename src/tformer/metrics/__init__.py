"""Metrics that judge a model's outputs independently of the model: numpy / scikit-learn only."""

from tformer.metrics.images import ImageJudge, frechet_distance, per_pixel_baseline

__all__ = ["ImageJudge", "frechet_distance", "per_pixel_baseline"]
