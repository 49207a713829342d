"""ONNX export (tformer.interop.onnx_export) and the onnxruntime decoder (onnx_decode): every
family's exported graphs equal the model's own forward pass (no cache, an independent path) at
batch 1 and 3 and several lengths, with onnxruntime's graph optimisations off and at its default
(ORT_ENABLE_ALL); greedy decoding in onnxruntime gives tformer's tokens; bad inputs are one line.

Exporting is slow (the dynamo exporter traces, decomposes and translates): each tiny model is
exported once per module and shared by the tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tformer.inference.generate import generate
from tformer.inference.translate import translate, translate_ids
from tformer.interop import onnx_export
from tformer.interop.onnx_decode import OnnxModel
from tformer.interop.onnx_export import OnnxExportError, export_onnx
from tformer.models.bert import BertConfig
from tformer.models.edits import note_edit
from tformer.models.gpt import GPTConfig
from tformer.models.image_gen import ImageGenConfig
from tformer.models.record import record_of
from tformer.models.registry import build_model
from tformer.models.seq2seq import Seq2SeqConfig
from tformer.models.transformer_xl import TransformerXLConfig
from tformer.models.vit import ViTConfig
from tformer.runs import Run
from tformer.tokenizers import CharTokenizer

TOL = 1e-4
LEVELS = ("disable", "all")  # no graph optimisation; onnxruntime's default (ORT_ENABLE_ALL)
CHARS = "abcdefghij "
SPECIALS = ["<pad>", "<bos>", "<eos>"]  # ids 11, 12, 13 after the characters

CONFIGS = {
    "gpt": GPTConfig(vocab_size=50, context_length=32, n_layers=1, n_heads=2, d_model=16),
    # RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases; layer 0 pruned to one KV group
    "llama": GPTConfig(vocab_size=50, context_length=32, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                       position="rope", norm="rmsnorm", activation="swiglu", bias=False),
    "seq2seq": Seq2SeqConfig(vocab_size=14, context_length=24, n_encoder_layers=1, n_decoder_layers=2, n_heads=2,
                             d_model=16, dropout=0.0, pad_id=11, bos_id=12, eos_id=13),
    "image_gen": ImageGenConfig(height=3, width=3, condition="text", condition_vocab=12, condition_length=6,
                                n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2),
    "bert": BertConfig(vocab_size=40, context_length=16, n_layers=1, n_heads=2, d_model=16, head="sequence",
                       labels=("neg", "pos"), dropout=0.0, attn_dropout=0.0),
    "vit": ViTConfig(image_size=8, patch_size=4, channels=1, n_classes=3, d_model=16, n_layers=1, n_heads=2),
}


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(CONFIGS[name]).eval()
    with torch.no_grad():  # larger weights than the init: logits far apart, outputs that vary
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    if name == "llama":  # pruned as compress.prune leaves it: another head count in layer 0
        model.blocks[0].attn.keep_heads([0, 1])
        model.blocks[1].ffn.keep_units(list(range(40)))
        note_edit(model, "prune", {"modules": {}, "importance": "test", "scope": "layer"})
    return model


def make_run(tmp: Path, model: torch.nn.Module, tokenizer: CharTokenizer | None = None) -> Run:
    tmp.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer.json")
    return Run(path=tmp, checkpoint=tmp, model=model, tokenizer=tokenizer, record=record_of(model))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """name -> (model, exported folder), each exported once."""
    out = {}
    for name in CONFIGS:
        root = tmp_path_factory.mktemp(name)
        model = tiny_model(name)
        tokenizer = CharTokenizer(list(CHARS), SPECIALS) if name == "seq2seq" else None
        out[name] = (model, export_onnx(make_run(root / "run", model, tokenizer), root / "onnx"))
    return out


def opened(exported: dict, name: str, level: str) -> tuple[torch.nn.Module, OnnxModel]:
    model, folder = exported[name]
    return model, OnnxModel(folder, optimization=level)


def assert_close(got: np.ndarray, expected: torch.Tensor) -> None:
    expected = expected.detach().numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)  # -inf (never <bos>) equal in place


# -- parity with the model's own forward pass --------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_causal_graph_matches_full_forward(exported: dict, name: str, level: str) -> None:
    model, onnx_model = opened(exported, name, level)
    rng = np.random.default_rng(0)
    for batch, length in [(1, 1), (3, 1), (1, 6), (3, 9)]:
        ids = rng.integers(0, 50, (batch, length))
        mask = np.ones_like(ids)
        mask[0, : length // 2] = 0  # left padding in row 0
        feed = {"input_ids": ids, "attention_mask": mask, **onnx_model._empty_past(batch)}
        logits, past = onnx_model._causal_step(feed)
        with torch.no_grad():
            assert_close(logits, model(torch.tensor(ids), attention_mask=torch.tensor(mask))[:, -1])
            cache = model.new_cache(batch, length)
            model(torch.tensor(ids), attention_mask=torch.tensor(mask), cache=cache)
        real = mask.astype(bool)  # padding slots are never attended (a padded query's empty row
        for i, layer in enumerate(cache.layers):  # differs: zeros in torch, uniform in the graph)
            for kind, expected in (("key", layer.keys), ("value", layer.values)):
                got = past[f"past_{kind}_{i}"].numpy().transpose(0, 2, 1, 3)[real]  # (real tokens, H, D)
                assert_close(got, expected.transpose(1, 2)[torch.tensor(real)])
        token = rng.integers(0, 50, (batch, 1))  # one step from that past
        step = {"input_ids": token, "attention_mask": np.ones_like(token), "past_mask": mask, **past}
        logits, _ = onnx_model._causal_step(step)
        whole, whole_mask = np.concatenate([ids, token], 1), np.concatenate([mask, np.ones_like(token)], 1)
        with torch.no_grad():
            expected = model(torch.tensor(whole), attention_mask=torch.tensor(whole_mask))[:, -1]
        assert_close(logits, expected)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ["seq2seq", "image_gen"])
def test_encoder_decoder_graphs_match_full_forward(exported: dict, name: str, level: str) -> None:
    model, onnx_model = opened(exported, name, level)
    rng = np.random.default_rng(1)
    encoder, step = onnx_model.sessions["encoder"], onnx_model.sessions["decoder"]
    n = onnx_model.decoder["n_layers"]
    vocab = onnx_model.decoder["vocab_size"] - (1 if name == "image_gen" else 0)  # not <bos>'s -inf logit
    for batch, source, target in [(1, 1, 1), (3, 5, 1), (3, 4, 3), (1, 6, 2)]:
        condition = rng.integers(1, 11, (batch, source))
        condition_mask = np.ones_like(condition)
        condition_mask[-1, max(1, source - 2):] = 0  # right padding in the last row
        ids = rng.integers(0, vocab, (batch, target))
        out = encoder.run(None, {"condition_ids": condition, "condition_mask": condition_mask, "input_ids": ids})
        decoder = model.bind(torch.tensor(condition), torch.tensor(condition_mask))
        with torch.no_grad():
            assert_close(out[0], decoder(torch.tensor(ids))[:, -1])
        token = rng.integers(0, vocab, (batch, 1))
        past = dict(zip([f"past_{k}_{i}" for i in range(n) for k in ("key", "value")], out[1:1 + 2 * n]))
        cross = dict(zip([f"cross_{k}_{i}" for i in range(n) for k in ("key", "value")], out[1 + 2 * n:]))
        logits = step.run(None, {"input_ids": token, "condition_mask": condition_mask, **past, **cross})[0]
        with torch.no_grad():
            assert_close(logits, decoder(torch.tensor(np.concatenate([ids, token], 1)))[:, -1])


@pytest.mark.parametrize("level", LEVELS)
def test_classifiers_match_the_model(exported: dict, level: str) -> None:
    rng = np.random.default_rng(2)
    bert, onnx_bert = opened(exported, "bert", level)
    for batch, length in [(1, 1), (3, 1), (1, 7), (3, 16)]:
        ids = rng.integers(0, 40, (batch, length))
        mask = np.ones_like(ids)
        mask[-1, max(1, length - 3):] = 0
        with torch.no_grad():
            assert_close(onnx_bert.classify(ids, mask), bert.classify(torch.tensor(ids), torch.tensor(mask)))
    vit, onnx_vit = opened(exported, "vit", level)
    for batch in (1, 3):
        images = rng.random((batch, 1, 8, 8), dtype=np.float32)
        with torch.no_grad():
            assert_close(onnx_vit.classify(images), vit.classify(torch.tensor(images)))


def test_manifest_says_what_each_graph_reads(exported: dict) -> None:
    manifest = json.loads((exported["llama"][1] / "manifest.json").read_text())
    assert manifest["kind"] == "causal_lm" and manifest["family"] == "gpt"
    inputs = {i["name"]: i["shape"] for i in manifest["graphs"]["decoder"]["inputs"]}
    assert inputs["input_ids"] == ["batch", "sequence"] and inputs["past_mask"] == ["batch", "past"]
    assert inputs["past_key_0"] == ["batch", 1, "past", 8] and inputs["past_key_1"] == ["batch", 2, "past", 8]
    assert manifest["decoder"]["kv_shapes"] == [[1, 8], [2, 8]]  # the pruned layer keeps one KV head
    seq2seq = json.loads((exported["seq2seq"][1] / "manifest.json").read_text())
    assert set(seq2seq["graphs"]) == {"encoder", "decoder"}
    assert {k: seq2seq["decoder"][k] for k in ("bos_id", "eos_id", "pad_id")} == {"bos_id": 12, "eos_id": 13,
                                                                                "pad_id": 11}
    assert (exported["seq2seq"][1] / "tokenizer.json").is_file()
    assert json.loads((exported["bert"][1] / "manifest.json").read_text())["labels"] == ["neg", "pos"]


# -- the onnxruntime decoder ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_greedy_generation_equals_tformer(exported: dict, name: str) -> None:
    model, onnx_model = opened(exported, name, "all")
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    expected = generate(model, prompts, 20, stop_tokens=[7]).numpy()
    got = onnx_model.generate(prompts, 20, stop_tokens=[7])
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got[:, 6:])) > 3  # a decoder that repeats one token would not test much


def test_translation_equals_tformer(exported: dict) -> None:
    model, onnx_model = opened(exported, "seq2seq", "all")
    tokenizer = CharTokenizer(list(CHARS), SPECIALS)
    sentences = ["abc", "hij ab", "a", "jjj ccc dd"]
    assert onnx_model.translate(sentences) == translate(model, tokenizer, sentences)
    sources = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    expected = translate_ids(model, sources, max_new_tokens=12)
    assert onnx_model.generate_conditioned(sources, 12) == expected
    assert len({t for row in expected for t in row}) > 1


def test_image_tokens_equal_tformer(exported: dict) -> None:
    model, onnx_model = opened(exported, "image_gen", "all")
    conditions = [[1, 2, 3], [4, 4]]
    ids, mask = torch.tensor([[1, 2, 3], [4, 4, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = generate(model.bind(ids, mask), torch.full((2, 1), model.config.bos_id), 9)[:, 1:]
    assert onnx_model.generate_conditioned(conditions, 9) == expected.tolist()


def test_sampling_is_seeded_and_filtered(exported: dict) -> None:
    _, onnx_model = opened(exported, "gpt", "all")
    options = {"temperature": 0.9, "top_k": 5, "top_p": 0.9}
    a = onnx_model.generate([[1, 2], [3]], 12, seed=3, **options)
    assert np.array_equal(a, onnx_model.generate([[1, 2], [3]], 12, seed=3, **options))
    assert not np.array_equal(a, onnx_model.generate([[1, 2], [3]], 12, seed=4, **options))
    top1 = onnx_model.generate([[1, 2], [3]], 12, seed=5, temperature=2.0, top_k=1)
    assert np.array_equal(top1, onnx_model.generate([[1, 2], [3]], 12))  # top-k 1 is greedy


def test_decoder_imports_no_torch(exported: dict) -> None:
    """A machine without PyTorch serves the folder: importing torch fails in the child process."""
    folder = exported["gpt"][1]
    code = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        from tformer.interop.onnx_decode import OnnxModel
        print(OnnxModel({str(folder)!r}).generate([[1, 2, 3]], 5).tolist())
        assert "torch" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    model = exported["gpt"][0]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == generate(model, [[1, 2, 3]], 5).tolist()


# -- bad inputs: one line, nothing written ---------------------------------------------------------------
def test_decoder_refuses_bad_inputs(exported: dict, tmp_path: Path) -> None:
    _, onnx_model = opened(exported, "gpt", "all")
    with pytest.raises(ValueError, match="context length"):
        onnx_model.generate([[1] * 30], 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        onnx_model.generate([[1, 50]], 5)
    with pytest.raises(ValueError, match="temperature"):
        onnx_model.generate([[1]], 5, temperature=-1.0)
    with pytest.raises(ValueError, match="needs a conditional_decoder"):
        onnx_model.translate(["abc"])
    with pytest.raises(ValueError, match="holds no manifest.json"):
        OnnxModel(tmp_path)


def test_output_folder_with_files_is_refused(exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    run = make_run(tmp_path / "run", exported["vit"][0])
    with pytest.raises(ValueError, match="not empty"):
        export_onnx(run, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("opset", [17, 99, "18"])
def test_opsets_outside_the_exporters_range_are_refused(opset: object, tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="opset must be"):
        export_onnx(make_run(tmp_path / "run", tiny_model("vit")), tmp_path / "out", opset=opset)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_an_opset_onnxruntime_cannot_load_is_one_line(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = tmp_path / "future.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)]), path)
    with pytest.raises(OnnxExportError, match="cannot load future.onnx.*older opset"):
        onnx_export.session(path)


def test_quantized_and_memory_models_are_refused_by_name(tmp_path: Path) -> None:
    from tformer.compress.quantize import quantize

    model = tiny_model("gpt")
    quantize(model)
    with pytest.raises(OnnxExportError, match="quantized.*quantize_dynamic"):
        export_onnx(make_run(tmp_path / "q", model), tmp_path / "out")
    txl = build_model(TransformerXLConfig(vocab_size=20, n_layers=1, n_heads=2, d_model=16, d_ff=32, seg_len=8,
                                          mem_len=8))
    with pytest.raises(OnnxExportError, match="transformer_xl.*MemoryLM"):
        export_onnx(make_run(tmp_path / "x", txl), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_written(graph: onnx_export.Graph, path: Path, opset: int) -> None:
        path.write_bytes(b"partial")
        raise OnnxExportError("the exporter could not trace the classifier graph: test")

    monkeypatch.setattr(onnx_export, "trace", half_written)
    with pytest.raises(OnnxExportError, match="could not trace"):
        export_onnx(make_run(tmp_path / "run", tiny_model("vit")), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no out, no temporary folder
