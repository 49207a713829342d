"""ONNX export of a trained run with the maintained exporter (`torch.onnx.export(..., dynamo=True)`),
one folder that onnxruntime serves without PyTorch (`tformer.interop.onnx_decode`):

    export_onnx("runs/gpt-shakespeare-char", "exported/")     # or `tformer export RUN --format onnx`

    manifest.json     what each graph reads and returns, what a decoder needs (vocabulary, context,
                      special ids, K/V shapes), labels of a classifier
    tokenizer.json    the run's tokenizer (when it reads text)
    decoder.onnx      CausalLM: prefill and decoding step in one graph (K/V as inputs and outputs)
    encoder.onnx +    ConditionalDecoder: the condition encoded with the decoder's first tokens (and
    decoder.onnx      every layer's cross K/V); then one step with the cross K/V as inputs
    classifier.onnx   TextClassifier / ImageClassifier (a BERT without classes: `encoder.onnx`)

What a model can do (`models.protocols`) chooses the graphs, never its family's name. Batch and
sequence axes are dynamic; every graph is then run in onnxruntime at other shapes than the
traced ones and compared with the model (the exporter can fix an axis silently), and the folder
is renamed into place only when all agree.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.export import Dim

from tformer.config import ConfigError
from tformer.files import atomic_directory, write_json_atomic
from tformer.interop.huggingface import check_empty_output
from tformer.interop.onnx_graphs import CausalStep, Classify, ConditionalPrefill, ConditionalStep
from tformer.models.edits import edit_kinds
from tformer.models.protocols import (
    CausalLM,
    Classifier,
    ConditionalDecoder,
    ImageClassifier,
    MemoryLM,
    TextClassifier,
    can,
    capabilities,
)
from tformer.models.record import FAMILY_KEY
from tformer.nn.attend import sdpa_attend
from tformer.runs import Run, open_run
from tformer.runs.run import TOKENIZER_FILE

log = logging.getLogger(__name__)

FORMAT, VERSION = "tformer-onnx", 1
MANIFEST = "manifest.json"
MIN_OPSET = 18  # the dynamo exporter's torchlib writes opset 18 and later
DEFAULT_OPSET = 23  # the first with an Attention op: SDPA exports as one node, not MatMul/Softmax/Where
CHECK_TOLERANCE = 1e-3  # export check: max abs difference from the model, relative to its outputs


class OnnxExportError(ConfigError):
    """A model or option ONNX export cannot take; one line."""


@dataclass
class Graph:
    """One graph to trace: the module, an example for tracing, the dynamic axes, and inputs of
    other shapes to run it with afterwards."""

    name: str
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    example: tuple[Tensor, ...]
    dynamic: tuple[Any, ...]
    checks: list[tuple[Tensor, ...]] = field(default_factory=list)


def kv_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _ids(batch: int, length: int, vocab: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, vocab, (batch, length), generator=generator)


def _left_padded(batch: int, length: int) -> Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and length > 1:
        mask[0, 0] = 0  # row 0 left-padded: the mask is read, not assumed
    return mask


# -- graphs by capability ---------------------------------------------------------------------------
def causal_graphs(model: nn.Module) -> tuple[list[Graph], dict[str, Any]]:
    """decoder.onnx: one graph for the prompt (empty past) and every step."""
    layers = model.new_cache(1, 1).layers
    shapes = [tuple(layer.keys.shape[1:2]) + tuple(layer.keys.shape[3:]) for layer in layers]  # (Hkv, D)
    vocab, n = model.config.vocab_size, len(layers)
    g = torch.Generator().manual_seed(0)

    def example(batch: int, new: int, past: int) -> tuple[Tensor, ...]:
        kv = [torch.randn(batch, h, past, d, generator=g) for h, d in shapes for _ in range(2)]
        return (_ids(batch, new, vocab, g), torch.ones(batch, new, dtype=torch.long), _left_padded(batch, past), *kv)

    B, T, P = Dim("batch"), Dim("sequence"), Dim("past")
    graph = Graph("decoder", CausalStep(model), ["input_ids", "attention_mask", "past_mask", *kv_names("past", n)],
                  ["logits", *kv_names("present", n)], example(2, 3, 4),
                  ({0: B, 1: T}, {0: B, 1: T}, {0: B, 1: P}, tuple({0: B, 2: P} for _ in range(2 * n))),
                  [example(1, 1, 0), example(3, 5, 0), example(3, 1, 6), example(1, 4, 2)])
    decoder = {"vocab_size": vocab, "context_length": model.config.context_length, "n_layers": n,
               "kv_shapes": [list(s) for s in shapes]}
    return [graph], decoder


def conditional_graphs(model: nn.Module) -> tuple[list[Graph], dict[str, Any]]:
    """encoder.onnx (condition + the decoder's first tokens -> logits, self and cross K/V) and
    decoder.onnx (a step with the cross K/V as inputs)."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    condition_len = int(getattr(c, "condition_length", None) or c.context_length)
    bound = model.bind(torch.ones(1, 1, dtype=torch.long))  # any condition: the step reads cross K/V only
    layers = bound.new_cache(1, 1).layers
    shapes = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in layers]
    n, vocab = len(layers), bound.config.vocab_size
    cross_heads = [(block.cross_attn.n_kv_heads, block.cross_attn.head_dim) for block in model.decoder]

    def condition(batch: int, length: int) -> tuple[Tensor, Tensor]:
        ids = torch.randint(1, 3, (batch, length), generator=g)  # ids 1-2 exist in every condition vocabulary
        mask = torch.ones(batch, length, dtype=torch.long)
        if batch > 1 and length > 1:
            mask[0, -1] = 0  # right padding, as translate and draw pad
        return ids, mask

    def prefill(batch: int, length: int, new: int) -> tuple[Tensor, ...]:
        return (*condition(batch, length), _ids(batch, new, vocab, g))

    def step(batch: int, length: int, past: int) -> tuple[Tensor, ...]:
        kv = [torch.randn(batch, h, past, d, generator=g) for h, d in shapes for _ in range(2)]
        cross = [torch.randn(batch, h, length, d, generator=g) for h, d in cross_heads for _ in range(2)]
        return (_ids(batch, 1, vocab, g), condition(batch, length)[1], *kv, *cross)

    S = Dim("condition", max=condition_len) if condition_len > 2 else None
    B, T, P = Dim("batch"), Dim("sequence"), Dim("past")
    s_len = 3 if S is not None else condition_len
    encoder = Graph("encoder", ConditionalPrefill(model, n), ["condition_ids", "condition_mask", "input_ids"],
                    ["logits", *kv_names("present", n), *kv_names("cross", n)], prefill(2, s_len, 2),
                    ({0: B, 1: S}, {0: B, 1: S}, {0: B, 1: T}),
                    [prefill(1, 1 if S is not None else s_len, 1), prefill(3, min(5, condition_len), 1)])
    step_graph = Graph("decoder", ConditionalStep(bound, n), ["input_ids", "condition_mask", *kv_names("past", n),
                                                              *kv_names("cross", n)],
                       ["logits", *kv_names("present", n)], step(2, s_len, 3),
                       ({0: B}, {0: B, 1: S}, (*({0: B, 2: P} for _ in range(2 * n)),
                                               *({0: B, 2: S} for _ in range(2 * n)))),
                       [step(1, s_len, 1), step(3, min(5, condition_len) if S is not None else s_len, 6)])
    decoder = {"vocab_size": vocab, "context_length": bound.config.context_length, "n_layers": n,
               "kv_shapes": [list(s) for s in shapes], "condition_length": condition_len,
               **{name: int(getattr(c, name)) for name in ("bos_id", "eos_id", "pad_id") if hasattr(c, name)}}
    return [encoder, step_graph], decoder


def classifier_graphs(model: nn.Module) -> tuple[list[Graph], dict[str, Any]]:
    """classifier.onnx (or encoder.onnx for a text encoder without classes)."""
    g = torch.Generator().manual_seed(0)
    if isinstance(model, ImageClassifier):
        height, width, channels = model.image_shape
        images = lambda b: (torch.rand(b, channels, height, width, generator=g),)
        graph = Graph("classifier", Classify(model, with_mask=False), ["images"], ["logits"], images(2),
                      ({0: Dim("batch")},), [images(1), images(3)])
        return [graph], {"image_shape": [height, width, channels]}
    vocab, limit = model.config.vocab_size, model.max_tokens  # TextClassifier

    def text(batch: int, length: int) -> tuple[Tensor, Tensor]:
        mask = torch.ones(batch, length, dtype=torch.long)
        if batch > 1 and length > 1:
            mask[0, -1] = 0
        return _ids(batch, length, vocab, g), mask

    name = "classifier" if can(model, TextClassifier) else "encoder"
    B, T = Dim("batch"), Dim("sequence", max=limit)
    graph = Graph(name, Classify(model, with_mask=True), ["input_ids", "attention_mask"],
                  ["logits" if name == "classifier" else "outputs"], text(2, min(5, limit)),
                  ({0: B, 1: T}, {0: B, 1: T}), [text(1, 1), text(3, min(7, limit))])
    return [graph], {"max_tokens": limit}


def graphs_for(model: nn.Module, family: str) -> tuple[str, list[Graph], dict[str, Any]]:
    """The kind of export, its graphs and what a decoder or classifier needs, by capability."""
    if can(model, ConditionalDecoder):
        return "conditional_decoder", *conditional_graphs(model)
    if can(model, CausalLM):
        return "causal_lm", *causal_graphs(model)
    if isinstance(model, (TextClassifier, ImageClassifier)) and isinstance(model, Classifier):
        kind = "image_classifier" if isinstance(model, ImageClassifier) else (
            "text_classifier" if can(model, TextClassifier) else "text_encoder")
        return kind, *classifier_graphs(model)
    if can(model, MemoryLM):
        raise OnnxExportError(f"ONNX export of a {family} model (MemoryLM: segment memory instead of a KV cache) "
                              "is not supported: its memory's length changes every segment until it is full, "
                              "which needs a graph per memory length or a padded memory with a mask")
    raise OnnxExportError(f"a {family} model can do {capabilities(model) or 'nothing tformer exports'}; ONNX "
                          "export covers causal LMs, encoder-decoders and text/image classifiers and encoders")


# -- checks -----------------------------------------------------------------------------------------
def check_opset(opset: int | None) -> int:
    """The opset to write: DEFAULT_OPSET, or one the exporter and onnx know."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        return max(MIN_OPSET, min(DEFAULT_OPSET, newest))
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise OnnxExportError(f"opset must be a whole number from {MIN_OPSET} (the oldest torch's dynamo exporter "
                              f"writes) to {newest} (the newest the installed onnx knows), got {opset!r}")
    return opset


def check_exportable(model: nn.Module, family: str) -> None:
    """Edits ONNX cannot hold, named with what would be needed."""
    if "quantize" in edit_kinds(model):
        raise OnnxExportError(f"this {family} run is quantized (tformer quantize: int8 QuantizedLinear layers, "
                              "whose kernels have no ONNX form here); export the float run it came from and "
                              "quantize the graph with onnxruntime.quantization.quantize_dynamic")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise OnnxExportError("ONNX export writes float32 graphs; this model holds other dtypes "
                              f"({sorted({str(p.dtype) for p in model.parameters()})})")


@contextlib.contextmanager
def dense_attention(model: nn.Module) -> Iterator[None]:
    """FlexAttention is compiled and cannot be traced: export its layers with SDPA and the same
    dense mask (the backends compute the same function; nn/attend.py's test holds them equal)."""
    swapped = [m for m in model.modules() if getattr(m, "backend", None) == "flex" and hasattr(m, "attend")]
    originals = [m.attend for m in swapped]
    for module in swapped:
        module.attend = sdpa_attend
    try:
        yield
    finally:
        for module, attend in zip(swapped, originals):
            module.attend = attend


# -- export -----------------------------------------------------------------------------------------
def trace(graph: Graph, path: Path, opset: int) -> None:
    """One graph written to `path`; a tracing failure is one line naming the graph."""
    try:
        program = torch.onnx.export(graph.module, graph.example, dynamo=True, input_names=graph.inputs,
                                    output_names=graph.outputs, dynamic_shapes=graph.dynamic,
                                    opset_version=opset, verbose=False)
    except Exception as e:  # the exporter raises many types; the innermost says what failed
        cause = e.__cause__ or e
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise OnnxExportError(f"the exporter could not trace the {graph.name} graph: {reason}") from e
    program.save(str(path))


def session(path: Path, level: Any = None, threads: int | None = None) -> Any:
    """An onnxruntime CPU session; a graph it cannot load (an opset newer than it runs) is one line."""
    import onnxruntime as ort

    from tformer.interop.onnx_decode import SLOW_FUSIONS

    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(SLOW_FUSIONS))
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidGraph, NotImplemented)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxExportError(f"onnxruntime {ort.__version__} cannot load {path.name}: {first}; choose an "
                              f"older opset (--opset {MIN_OPSET}) or a newer onnxruntime") from e


def check_graph(graph: Graph, path: Path) -> None:
    """Run the written graph at shapes other than the traced one and compare it with the model."""
    runner = session(path)
    for inputs in graph.checks:
        with torch.no_grad():
            result = graph.module(*inputs)
        expected = [t.numpy() for t in ((result,) if isinstance(result, Tensor) else result)]
        feed = {name: t.numpy() for name, t in zip(graph.inputs, inputs)}
        shape = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(graph.inputs[:2], inputs))
        try:
            got = runner.run(graph.outputs, feed)
        except Exception as e:  # a shape the exporter fixed fails inside onnxruntime
            raise OnnxExportError(f"the exported {graph.name} graph fails at {shape}: the exporter fixed an axis "
                                  f"the model needs free ({str(e).strip().splitlines()[0]})") from e
        for name, a, b in zip(graph.outputs, got, expected):
            finite = np.isfinite(b)
            scale = max(1.0, float(np.abs(b[finite]).max(initial=0.0)))
            if a.shape != b.shape or (np.isfinite(a) != finite).any() or \
                    float(np.abs(a[finite] - b[finite]).max(initial=0.0)) > CHECK_TOLERANCE * scale:
                raise OnnxExportError(f"the exported {graph.name} graph differs from the model at {shape} "
                                      f"(output {name}); it was not written")


def graph_signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a written graph as onnx reads them: name, element type, shape (a name
    for a dynamic axis, a number for a fixed one)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": dims}

    return {"inputs": [describe(v) for v in proto.graph.input], "outputs": [describe(v) for v in proto.graph.output]}


def eos_id(run: Run) -> int | None:
    """The tokenizer's end-of-text id, if it has one (a CausalLM's default stop token)."""
    if run.tokenizer is None:
        return None
    from tformer.tokenizers.bpe import find_eos_id

    return find_eos_id(run.tokenizer.special_tokens)


def manifest(run: Run, family: str, kind: str, opset: int, graphs: dict[str, Any],
             details: dict[str, Any]) -> dict[str, Any]:
    model = run.model
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "family": family, "kind": kind,
                           "opset": opset, "torch": torch.__version__, "graphs": graphs,
                           "tokenizer": TOKENIZER_FILE if run.tokenizer is not None else None,
                           "source": {"run": str(run.path), "checkpoint": str(run.checkpoint)}}
    if kind in ("causal_lm", "conditional_decoder"):
        details = dict(details)
        if kind == "causal_lm":
            details.setdefault("eos_id", eos_id(run))
        out["decoder"] = details
    else:
        out.update(details)
    if isinstance(model, Classifier) and kind.endswith("classifier"):
        out["labels"] = list(model.labels)
    return out


def export_onnx(run: str | Path | Run, out: str | Path, *, checkpoint: str = "best",
                opset: int | None = None) -> Path:
    """Export a run's model (see the module docstring) into the new folder `out`; returns it.
    `run`: a run directory or checkpoint folder (opened with `open_run`), or an open Run."""
    out = Path(out).expanduser()
    check_empty_output(out)
    opset = check_opset(opset)
    run = run if isinstance(run, Run) else open_run(run, checkpoint)
    model = run.model.eval()
    family = str(run.record.get(FAMILY_KEY, type(model).__name__))
    check_exportable(model, family)
    kind, graphs, details = graphs_for(model, family)
    written: dict[str, Any] = {}
    with dense_attention(model), atomic_directory(out) as folder:
        for graph in graphs:
            path = folder / f"{graph.name}.onnx"
            log.info("exporting the %s graph of %s", graph.name, run.path)
            trace(graph, path, opset)
            check_graph(graph, path)
            written[graph.name] = {"file": path.name, **graph_signature(path)}
        if (run.path / TOKENIZER_FILE).is_file():  # the run's file as it is
            shutil.copyfile(run.path / TOKENIZER_FILE, folder / TOKENIZER_FILE)
        elif run.tokenizer is not None:
            run.tokenizer.save(folder / TOKENIZER_FILE)
        write_json_atomic(folder / MANIFEST, manifest(run, family, kind, opset, written, details))
    return out


__all__ = ["MANIFEST", "OnnxExportError", "export_onnx"]
