"""Data for tformer: named datasets (find or fetch them), text corpora tokenized into cached
memmaps, and causal-LM batches that depend only on (seed, step)."""

from tformer.data.datasets import (
    DATASETS,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetSpec,
    cache_root,
    fetch_dataset,
    get_dataset,
    list_datasets,
    resolve_dataset,
)
from tformer.data.fetchers import FetchError, Progress
from tformer.data.text import (
    CorpusError,
    TextEncoder,
    TokenizedCorpus,
    causal_lm_batch,
    eval_batches,
    load_text,
    split_at_line_breaks,
)

__all__ = [
    "DATASETS", "CorpusError", "DatasetInfo", "DatasetNotFoundError", "DatasetSpec", "FetchError",
    "Progress", "TextEncoder", "TokenizedCorpus", "cache_root", "causal_lm_batch", "eval_batches",
    "fetch_dataset", "get_dataset", "list_datasets", "load_text", "resolve_dataset",
    "split_at_line_breaks",
]
