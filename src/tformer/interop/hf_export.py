"""Any run's model to Hugging Face's format, by what it can be exported as: the one table of
twins (`TWINS`) picks GPT-2, Llama, BERT or ViT from the model's config, and a run's tokenizer
becomes an HF tokenizer.json (character tokenizers included, as a WordLevel model).

    export_run("runs/gpt-shakespeare-char", "hf/shakespeare")   # config.json, model.safetensors, tokenizer.json
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from torch import nn

from tformer.config import ConfigError
from tformer.interop.hf_bert import bert_problems, save_bert
from tformer.interop.hf_llama import llama_problems, save_llama
from tformer.interop.hf_vit import save_vit, vit_problems
from tformer.interop.huggingface import TOKENIZER_FILE, check_export_folder, gpt2_problems, save_gpt2
from tformer.models.bert import BertConfig
from tformer.models.gpt import GPTConfig
from tformer.models.vit import ViTConfig
from tformer.runs import open_run
from tformer.tokenizers import BPETokenizer, CharTokenizer, HFJsonTokenizer, Tokenizer
from tformer.tokenizers.bpe import find_eos_id

log = logging.getLogger(__name__)

Save = Callable[[nn.Module, Path, "Tokenizer | None"], Path]


@dataclass(frozen=True)
class Twin:
    """A transformers architecture a tformer config can be written as."""

    name: str  # as messages say it
    config_type: type
    problems: Callable[[Any], list[str]]  # what the twin cannot hold in a config; empty: it fits
    save: Save


def _text_documents(tokenizer: Tokenizer | None) -> dict[str, Any]:
    return {} if tokenizer is None else {TOKENIZER_FILE: hf_tokenizer_json(tokenizer)}


def _eos(tokenizer: Tokenizer | None) -> int | None:
    """The end-of-text id (<|endoftext|>, </s>, ...: the one generation stops at), or None."""
    return None if tokenizer is None else find_eos_id(tokenizer.special_tokens)


def _save_gpt2(model: nn.Module, out: Path, tokenizer: Tokenizer | None) -> Path:
    eos = _eos(tokenizer)
    return save_gpt2(model, out, bos_token_id=eos, eos_token_id=eos, documents=_text_documents(tokenizer))


def _save_llama(model: nn.Module, out: Path, tokenizer: Tokenizer | None) -> Path:
    eos = _eos(tokenizer)
    return save_llama(model, out, bos_token_id=eos, eos_token_id=eos, documents=_text_documents(tokenizer))


def _save_bert(model: nn.Module, out: Path, tokenizer: Tokenizer | None) -> Path:
    pad = tokenizer.special_tokens.get("[PAD]", 0) if tokenizer is not None else 0
    return save_bert(model, out, pad_token_id=pad, documents=_text_documents(tokenizer))


def _save_vit(model: nn.Module, out: Path, tokenizer: Tokenizer | None) -> Path:
    return save_vit(model, out)


# the one place family names meet transformers classes; tried in order, the first that fits wins
TWINS = (Twin("GPT-2", GPTConfig, gpt2_problems, _save_gpt2), Twin("Llama", GPTConfig, llama_problems, _save_llama),
         Twin("BERT", BertConfig, bert_problems, _save_bert), Twin("ViT", ViTConfig, vit_problems, _save_vit))


def hf_twin(config: Any) -> Twin:
    """The twin `config` can be exported as; one ConfigError naming, for each twin of its kind,
    what it cannot hold (or that the kind has none)."""
    kind = type(config).__name__.removesuffix("Config")
    candidates = [twin for twin in TWINS if isinstance(config, twin.config_type)]
    if not candidates:
        known = ", ".join(sorted({twin.config_type.__name__.removesuffix("Config") for twin in TWINS}))
        raise ConfigError(f"a {kind} model has no Hugging Face twin tformer can write (it writes {known} "
                          "models); a new twin is a Twin in interop.hf_export.TWINS")
    for twin in candidates:
        if not twin.problems(config):
            return twin
    reasons = "; ".join(f"as {twin.name} it has {', '.join(twin.problems(config))}" for twin in candidates)
    raise ConfigError(f"cannot export this {kind} to Hugging Face: {reasons}")


def char_tokenizer_json(tokenizer: CharTokenizer) -> dict[str, Any]:
    """A character tokenizer as an HF tokenizer.json: every character one piece (WordLevel, the
    same ids), special tokens after the characters, decoded by joining the pieces."""
    vocab = {char: i for i, char in enumerate(tokenizer.chars)}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token=None))
    rust.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    rust.decoder = decoders.Fuse()
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    rust.add_special_tokens(specials)
    return json.loads(rust.to_str())


def hf_tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The HF tokenizer.json of a run's tokenizer, giving the same ids."""
    if isinstance(tokenizer, HFJsonTokenizer):
        return tokenizer.to_dict()
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.to_dict()["tokenizer"]  # HF's own file inside tformer's header
    if isinstance(tokenizer, CharTokenizer):
        return char_tokenizer_json(tokenizer)
    raise ValueError(f"a {type(tokenizer).__name__} has no Hugging Face tokenizer.json form")


def export_hf(model: nn.Module, out: str | os.PathLike, tokenizer: Tokenizer | None = None) -> tuple[Path, str]:
    """Write `model` (and its tokenizer as tokenizer.json) as a new HF checkpoint folder `out`;
    the folder and the twin's name. A new or empty folder only, written whole or not at all."""
    config = getattr(model, "config", None)
    twin = hf_twin(config)
    check_export_folder(Path(out))
    return twin.save(model, Path(out), tokenizer), twin.name


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, checkpoint: str = "best") -> tuple[Path, str]:
    """A run directory's model (checkpoints/`checkpoint`) and tokenizer as a new HF checkpoint
    folder `out`; the folder and the twin's name. `out` is checked before the run is opened."""
    check_export_folder(Path(out))
    opened = open_run(run, checkpoint)
    return export_hf(opened.model, out, opened.tokenizer)


__all__ = ["TWINS", "Twin", "char_tokenizer_json", "export_hf", "export_run", "hf_tokenizer_json", "hf_twin"]
