"""tformer: one set of components for the whole life of Transformer models."""

__version__ = "0.1.0"
