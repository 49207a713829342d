"""Hugging Face BERT checkpoints (BertModel, BertForMaskedLM, BertForSequenceClassification,
BertForTokenClassification; MiniLM is a BertModel) <-> `tformer.models.bert.Bert`.

A checkpoint directory holds config.json + model.safetensors (or a sharded index) and, to be
usable for text, tokenizer.json. Pickles are never loaded. HF's separate query/key/value Linears
become our fused `qkv_proj` (rows [q | k | v]); old "gamma"/"beta" LayerNorm names are accepted.
`convert_bert` writes a tformer checkpoint that recipes can fine-tune (`model.init_from`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from tformer.config import ConfigError, check_choice
from tformer.files import read_json
from tformer.interop.huggingface import (CONFIG_FILE, check_counts, check_empty_output, dtype_name, gather_tensors,
                                         load_checkpoint_tokenizer, read_safetensors, refuse_edits, split_rows,
                                         write_checkpoint, write_run)
from tformer.models.bert import HEADS, Bert, BertConfig
from tformer.tokenizers import HFJsonTokenizer

log = logging.getLogger(__name__)

ARCHITECTURE_HEADS = {"BertModel": "none", "BertForMaskedLM": "mlm", "BertForPreTraining": "mlm",
                      "BertForSequenceClassification": "sequence", "BertForTokenClassification": "token"}
HEAD_ARCHITECTURES = {"none": "BertModel", "mlm": "BertForMaskedLM", "sequence": "BertForSequenceClassification",
                      "token": "BertForTokenClassification"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
# options BERT configs may carry that our encoder cannot honour: key -> the only value we can
UNSUPPORTED = {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False}
IGNORED = ("embeddings.position_ids", "cls.seq_relationship.")  # a buffer; next-sentence head
LAYER_PARTS = {"attn.out_proj": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
               "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ffn_norm": "output.LayerNorm"}


def _labels(hf: dict) -> tuple[str, ...]:
    """Class names from id2label; HF leaves it out for its default of 2 (LABEL_0, LABEL_1)."""
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    return tuple(str(id2label[k]) for k in sorted(id2label, key=int))


def hf_config_to_bert(hf: dict, where: str, *, head: str | None = None) -> BertConfig:
    """Our BertConfig for an HF BERT config.json dict; `head` None: from its architecture."""
    if hf.get("model_type") != "bert":
        raise ConfigError(f"model_type={hf.get('model_type')!r} in {where}: only 'bert' checkpoints "
                          "(BERT, MiniLM) can be loaded as a tformer Bert")
    for key, allowed in UNSUPPORTED.items():
        if hf.get(key, allowed) != allowed:
            raise ConfigError(f"{key}={hf[key]!r} in {where} is not supported (only {allowed!r})")
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ConfigError(f"hidden_act={act!r} in {where} is not supported; choose one of "
                          f"{sorted(HF_ACTIVATIONS)}")
    check_counts(hf, ("vocab_size", "max_position_embeddings", "type_vocab_size", "num_hidden_layers",
                      "num_attention_heads", "hidden_size", "intermediate_size", "num_labels"), where)
    if head is None:
        arch = (hf.get("architectures") or ["BertModel"])[0]
        head = ARCHITECTURE_HEADS.get(arch, "none")
    labels = _labels(hf) if head in ("sequence", "token") else ()
    classifier_dropout = hf.get("classifier_dropout")
    if classifier_dropout is not None and classifier_dropout != hf.get("hidden_dropout_prob", 0.1):
        log.info("%s: classifier_dropout=%s differs from hidden_dropout_prob; tformer uses the latter",
                 where, classifier_dropout)
    return BertConfig(
        vocab_size=hf.get("vocab_size", 30522), context_length=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), n_layers=hf.get("num_hidden_layers", 12),
        n_heads=hf.get("num_attention_heads", 12), d_model=hf.get("hidden_size", 768),
        d_ff=hf.get("intermediate_size", 3072), dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        attn_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
        activation=HF_ACTIVATIONS[act], norm_eps=float(hf.get("layer_norm_eps", 1e-12)), head=head,
        labels=labels, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("initializer_range", 0.02)))


def load_bert_config(path: str | os.PathLike, *, head: str | None = None) -> BertConfig:
    """The BertConfig of the HF checkpoint directory `path` (its config.json)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a Hugging Face checkpoint directory?")
    return hf_config_to_bert(read_json(file, "Hugging Face config"), str(file), head=head)


def tensor_names(config: BertConfig) -> dict[str, list[str]]:
    """Our state-dict name -> the HF names (without a "bert." prefix) concatenated into it."""
    names = {"tok_emb.weight": ["embeddings.word_embeddings.weight"],
             "pos_emb.embedding.weight": ["embeddings.position_embeddings.weight"],
             "type_emb.weight": ["embeddings.token_type_embeddings.weight"]}
    for kind in ("weight", "bias"):
        names[f"emb_norm.{kind}"] = [f"embeddings.LayerNorm.{kind}"]
        for i in range(config.n_layers):
            hf = f"encoder.layer.{i}."
            names[f"blocks.{i}.attn.qkv_proj.{kind}"] = [f"{hf}attention.self.{p}.{kind}"
                                                        for p in ("query", "key", "value")]
            for ours, theirs in LAYER_PARTS.items():
                names[f"blocks.{i}.{ours}.{kind}"] = [f"{hf}{theirs}.{kind}"]
    return names


def head_tensor_names(config: BertConfig) -> dict[str, list[str]]:
    """The head's tensors, for the head `config` names."""
    pairs: dict[str, str] = {}
    if config.head == "mlm":
        pairs = {"head.dense": "cls.predictions.transform.dense",
                 "head.norm": "cls.predictions.transform.LayerNorm"}
    elif config.head == "sequence":
        pairs = {"head.classifier": "classifier"}
        if config.pooling == "cls":
            pairs["head.pooler.dense"] = "pooler.dense"
    elif config.head == "token":
        pairs = {"head.classifier": "classifier"}
    names = {f"{ours}.{kind}": [f"{theirs}.{kind}"] for ours, theirs in pairs.items()
             for kind in ("weight", "bias")}
    if config.head == "mlm":
        names["head.decoder.bias"] = ["cls.predictions.bias"]
        if not config.tie_embeddings:
            names["head.decoder.weight"] = ["cls.predictions.decoder.weight"]
    return names


def _canonical(name: str) -> str:
    """Stored name -> the name tensor_names uses: no "bert." prefix, gamma/beta -> weight/bias."""
    name = name.removeprefix("bert.")
    if name.endswith((".gamma", ".beta")):
        name = name.rsplit(".", 1)[0] + (".weight" if name.endswith(".gamma") else ".bias")
    return name


def load_bert(path: str | os.PathLike, *, head: str | None = None, labels: Sequence[str] | None = None,
              pooling: str | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Bert:
    """A Bert (eval mode) with the weights of the HF BERT checkpoint directory `path`.

    head: "none", "mlm", "sequence" or "token"; None takes the checkpoint's architecture. A head
    the checkpoint lacks (or whose label count differs) starts freshly initialised, logged; then
    `labels` name its classes. Missing encoder tensors and wrong shapes raise one ValueError.
    """
    root = Path(path)
    if head is not None:
        check_choice("head", head, HEADS)
    config = load_bert_config(root, head=head)
    overrides = {"pooling": pooling} if pooling else {}
    if labels is not None:
        overrides["labels"] = tuple(labels)
    config = dataclasses.replace(config, **overrides)
    tensors, _ = read_safetensors(root, _canonical, "AutoModel")
    if config.head == "mlm" and not config.tie_embeddings and "cls.predictions.decoder.bias" in tensors:
        tensors["cls.predictions.bias"] = tensors["cls.predictions.decoder.bias"]  # untied: the one it adds
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Bert(config).state_dict().items()}
    state, problems = gather_tensors(tensor_names(config), tensors, shapes)
    if problems:
        raise ValueError(f"checkpoint {root} does not match its config: " + "; ".join(problems))
    head_state, head_problems = gather_tensors(head_tensor_names(config), tensors, shapes)
    state.update(head_state)  # what fits; the rest of the head keeps its initialisation
    if head_problems:
        log.info("%s: %d tensors of the %s head start fresh (%s)", root, len(head_problems),
                 config.head, head_problems[0])
    used = {n for names in [*tensor_names(config).values(), *head_tensor_names(config).values()]
            for n in names}
    extra = [n for n in tensors if n not in used and not n.startswith(IGNORED)]
    if extra:
        log.info("%s: %d tensors unused by a %r head, e.g. %s", root, len(extra), config.head, extra[:3])
    with torch.device(device or "cpu"):
        model = Bert(config)
    model.to(dtype or state["tok_emb.weight"].dtype)
    model.load_state_dict(state, strict=False)  # a fresh head keeps its initialisation
    log.info("loaded BERT checkpoint %s (%d layers, d_model=%d, head=%s)", root, config.n_layers,
             config.d_model, config.head)
    return model.eval()


def load_bert_tokenizer(path: str | os.PathLike) -> HFJsonTokenizer:
    """The checkpoint's tokenizer.json (WordPiece for BERT); a clear error when it has none."""
    return load_checkpoint_tokenizer(path)


def convert_bert(path: str | os.PathLike, out_dir: str | os.PathLike, *, head: str | None = None,
                 labels: Sequence[str] | None = None, pooling: str | None = None) -> Path:
    """Write the HF checkpoint `path` as a new tformer run directory (checkpoints/best +
    tokenizer.json), which `tformer.runs.open_run` reads and recipes fine-tune from
    (`model.init_from: out_dir`). The tokenizer is checked first, so a directory without one
    writes nothing."""
    check_empty_output(Path(out_dir))
    tokenizer = load_bert_tokenizer(path)
    model = load_bert(path, head=head, labels=labels, pooling=pooling)
    return write_run(out_dir, model, path, tokenizer)


def bert_problems(config: BertConfig) -> list[str]:
    """What HF BERT cannot express in `config`, one phrase each (empty: it can)."""
    if config.head == "sequence" and config.pooling != "cls":
        return [f"pooling={config.pooling!r} (BertForSequenceClassification classifies the pooled [CLS] "
                "state; a mean-pooling head has no transformers class)"]
    return []


def bert_config_to_hf(config: BertConfig, *, pad_token_id: int = 0) -> dict[str, Any]:
    """The config.json dict of the transformers class for `config`'s head; ConfigError if none."""
    problems = bert_problems(config)
    if problems:
        raise ConfigError(f"cannot export {'; '.join(problems)} to HF BERT")
    hf = {"model_type": "bert", "architectures": [HEAD_ARCHITECTURES[config.head]],
          "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
          "num_attention_heads": config.n_heads, "intermediate_size": config.ffn_dim,
          "hidden_act": TO_HF_ACTIVATION[config.activation], "hidden_dropout_prob": config.dropout,
          "attention_probs_dropout_prob": config.attn_dropout, "max_position_embeddings": config.context_length,
          "type_vocab_size": config.type_vocab_size, "initializer_range": config.init_std,
          "layer_norm_eps": config.norm_eps, "pad_token_id": pad_token_id, "tie_word_embeddings":
          config.tie_embeddings, "classifier_dropout": None, **UNSUPPORTED}
    if config.labels:
        hf["id2label"] = {str(i): label for i, label in enumerate(config.labels)}
        hf["label2id"] = {label: i for i, label in enumerate(config.labels)}
    return hf


def save_bert(model: Bert, path: str | os.PathLike, *, pad_token_id: int = 0,
              documents: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a new HF checkpoint folder at `path` for the transformers class of its head
    (BertModel, BertForMaskedLM, BertForSequenceClassification with id2label/label2id,
    BertForTokenClassification): config.json + model.safetensors + `documents` (tokenizer.json),
    whole or not at all. BertModel gets no pooler (tformer's encoder has none)."""
    if not isinstance(model, Bert):
        raise TypeError(f"save_bert exports a tformer Bert, got {type(model).__name__}")
    refuse_edits(model, "HF BERT")
    config = model.config
    hf_config = bert_config_to_hf(config, pad_token_id=pad_token_id)
    state = model.state_dict()
    hf_config["dtype"] = hf_config["torch_dtype"] = dtype_name(state["tok_emb.weight"])
    names = {**tensor_names(config), **head_tensor_names(config)}
    tied = {"head.decoder.weight"} if config.head == "mlm" and config.tie_embeddings else set()
    uncovered = sorted(set(state) - set(names) - tied)
    if uncovered:  # a head the config does not describe
        raise ConfigError(f"cannot export {uncovered[0]}: BERT's {config.head!r} head has no such tensor")
    full = {ours: [n if n.startswith(("cls.", "classifier.")) else "bert." + n for n in theirs]
            for ours, theirs in names.items()}
    tensors = split_rows(full, state)
    if config.head == "mlm" and not config.tie_embeddings:  # untied, transformers 5 reads the decoder's own
        tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].clone()
    write_checkpoint(path, hf_config, tensors, documents)
    log.info("saved BERT checkpoint (%s) to %s", hf_config["architectures"][0], path)
    return Path(path)
