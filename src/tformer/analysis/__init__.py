"""Explaining trained models: attention maps from any backend, attention rollout (plain and
gradient-weighted). Rank 8: uses models, runs, inference and nn; never training or cli."""

from tformer.analysis.attention import AttentionMaps, attention_maps, attention_sites, capture_attention

# integrated gradients (tformer.analysis.attribution): from tformer.analysis.attribution import Attribution, integrated_gradients

__all__ = ["AttentionMaps", "attention_maps", "attention_sites", "capture_attention"]
