"""Explaining trained models: attention maps from any backend, attention rollout (plain and
gradient-weighted), integrated gradients; `explain(run, input)` puts them together for one input
of any run, `figures` draws it and `page` writes it as one self-contained HTML page (`tformer
explain`). Rank 8: uses models, runs, inference and nn; never training or cli."""

from tformer.analysis.attention import AttentionMaps, attention_maps, attention_sites, capture_attention
from tformer.analysis.attribution import Attribution, integrated_gradients
from tformer.analysis.explain import Explanation, Options, explain
from tformer.analysis.rollout import (Relevance, explain_classifier, explain_generation, gradient_rollout,
                                      rollout)

__all__ = ["AttentionMaps", "Attribution", "Explanation", "Options", "Relevance", "attention_maps", "attention_sites",
           "capture_attention", "explain", "explain_classifier", "explain_generation", "gradient_rollout",
           "integrated_gradients", "rollout"]
