"""`tformer explain` on every kind of trained run (the session's tiny recipe runs): the numbers on
the page are the library's numbers, the page is self-contained and renders in headless Chromium,
figures are real PNGs, and bad input is one line before anything is written."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from tformer.analysis import attention_maps, explain_classifier, explain_generation, integrated_gradients
from tformer.analysis.attribution import next_token, text_class, token_baseline
from tformer.analysis.explain import GRADIENT_ROLLOUT, IG, ROLLOUT, Options, explain
from tformer.cli import main
from tformer.cli.explain_command import MARKER
from tformer.data.labelled import encode_texts, special_ids
from tformer.runs import open_run

pytestmark = pytest.mark.usefixtures("one_thread")

INPUTS = {  # run -> input, figures besides attributions.png
    "bert-sentiment": ("the film was good", ["attention-self"]),
    "vit-mnist": ("{png}", ["attention-self"]),
    "gpt-shakespeare-char": ("the king", ["attention-self"]),
    "transformer-xl-shakespeare": ("my lord", ["attention-self"]),
    "nmt-de-en": ("the war", ["attention-encoder", "attention-decoder", "attention-cross", "alignment"]),
    "image-gen-digits": ("seven", ["attention-encoder", "attention-decoder", "attention-cross"]),
}


def embedded_views(page: str) -> list[dict]:
    found = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', page, re.S)
    return json.loads(found.group(1).replace("<\\/", "</"))


@pytest.mark.parametrize("name", list(INPUTS))
def test_explain_writes_figures_and_a_self_contained_page(name, trained, seven_png, tmp_path, capsys):
    item, figures = INPUTS[name]
    item = item.format(png=seven_png)
    out = tmp_path / "out"
    assert main(["explain", str(trained[name]), item, "--steps", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert str(folder / "index.html") in printed
    for figure in ["attributions", *figures]:
        with Image.open(folder / f"{figure}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=\"(?!data:)|https?://|<link", page), "the page must need no network"
    assert page.count("data:image/png;base64,") >= 1 + len(figures)
    views = embedded_views(page)
    run = open_run(trained[name])
    kinds = {"nmt-de-en": ["encoder", "decoder", "cross"], "image-gen-digits": ["encoder", "decoder", "cross"]}
    assert [v["kind"] for v in views] == kinds.get(name, ["self"])
    for v in views:
        maps = np.array(v["maps"], dtype=np.float64)  # null (a key the query never sees) -> nan
        assert maps.shape[:2] == (len(v["layers"]), len(v["heads"]))
        assert maps.shape[2:] == (len(v["queries"]), len(v["keys"]))
        rows = np.nansum(maps, -1)  # rows of probabilities; an image generator's decoder map drops <bos>
        if (name, v["kind"]) == ("image-gen-digits", "decoder"):
            assert (rows <= 1 + 2e-3).all() and v["keys"][0] == "pixel (0, 0)"
        else:
            np.testing.assert_allclose(rows, 1.0, atol=2e-3)
    assert html.escape(run.path.as_posix()) in page


def test_the_page_shows_the_library_numbers(trained):
    """A classifier's and a language model's explanation equal the analysis functions called directly."""
    run = open_run(trained["bert-sentiment"])
    e = explain(run, "the film was good", Options(n_steps=8))
    specials = special_ids(run.tokenizer)
    ids = torch.from_numpy(encode_texts(["the film was good"], run.tokenizer, specials, max_length=32)[0])[None]
    baseline = token_baseline(ids, specials.mask, keep=(specials.cls, specials.sep))
    expected = integrated_gradients(text_class(run.model, ids), baseline, n_steps=8).per_position[0]
    np.testing.assert_allclose(e.attributions[IG], expected.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e.attributions[GRADIENT_ROLLOUT],
                               explain_classifier(run.model, ids).scores[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(e.attributions[ROLLOUT],
                               explain_classifier(run.model, ids, method="rollout").scores[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(e.attention[0].maps, attention_maps(run.model.classify, ids).stack("self")[:, 0])
    assert e.positions[0] == "[CLS]" and e.positions[-1] == "[SEP]" and len(e.positions) == ids.shape[1]

    run = open_run(trained["gpt-shakespeare-char"])
    e = explain(run, "the king", Options(n_steps=8, layers=[0], heads=[1]))
    prompt = torch.tensor([run.tokenizer.encode("the king")])
    explained = next_token(run.model, prompt)
    np.testing.assert_allclose(e.attributions[IG], integrated_gradients(explained, n_steps=8).per_position[0],
                               rtol=1e-5, atol=1e-7)
    full = torch.cat([prompt, torch.tensor([explained.target])], 1)
    np.testing.assert_allclose(e.attributions[GRADIENT_ROLLOUT], explain_generation(run.model, full).scores[0])
    assert e.attention[0].maps.shape == (1, 1, 9, 9) and e.attention[0].heads == [1]


def test_an_image_generator_explains_one_pixel_from_the_pixels_before_it(trained):
    run = open_run(trained["image-gen-digits"])
    e = explain(run, "seven", Options(n_steps=4, pixel=10))
    heat = e.attributions[IG]
    assert heat.shape == (64,) and np.isfinite(heat[:10]).all() and np.isnan(heat[10:]).all()
    assert e.focus == 10 and e.grid == (8, 8) and e.image.shape == (8, 8, 1)
    decoder = next(v for v in e.attention if v.kind == "decoder")
    assert decoder.maps.shape[2:] == (1, 64) and decoder.key_grid == (8, 8)
    assert np.nansum(decoder.maps[..., 10:]) == 0  # pixel 10 reads only pixels drawn before it


@pytest.mark.parametrize("args, message", [
    (["{bert}", "good", "--layers", "3"], "layer 3 is out of range: self attention has layers 0..0"),
    (["{bert}", "good", "--heads", "0,7"], "head 7 is out of range: the attention has heads 0..1"),
    (["{bert}", "good", "--target", "neutral"], "unknown class 'neutral'; the model's classes are neg, pos"),
    (["{bert}", "good", "--target", "5"], "class 5 is not one of the model's 2 classes"),
    (["{bert}", " ".join(["good"] * 40)], "the text is \\d+ tokens with \\[CLS\\] and \\[SEP\\]; this model "
                                          "reads at most 32: shorten it"),
    (["{gpt}", "the king " * 4], "the prompt is 36 tokens; explain a prompt of 1..15 tokens"),
    (["{vit}", "a sentence"], "'a sentence' is not an image file"),
    (["{mlm}", "the king"], "holds a model with nothing to explain"),
    (["{gen}", "seven", "--pixel", "64"], "pixel 64 is outside the image's 64 pixels"),
    (["{gen}", "eleven"], "unknown class 'eleven'"),
    (["{bert}", "good", "--steps", "0"], "0 is not a whole number >= 1"),
    (["{bert}", "good", "--layers", "one"], "expected comma-separated whole numbers"),
    (["{bert}", "good", "--out", "{foreign}"], "holds files tformer explain did not write"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, trained, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes", encoding="utf-8")
    names = {"bert": trained["bert-sentiment"], "gpt": trained["gpt-shakespeare-char"],
             "vit": trained["vit-mnist"], "mlm": trained["bert-mlm-shakespeare"],
             "gen": trained["image-gen-digits"], "foreign": foreign}
    before = {p: sorted(p.rglob("*")) for p in names.values()}
    assert main(["explain", *[a.format(**names) for a in args]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert {p: sorted(p.rglob("*")) for p in names.values()} == before
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "my notes"


def test_explaining_again_replaces_only_its_own_folders(trained, tmp_path, capsys):
    out = tmp_path / "explained"
    run = str(trained["bert-sentiment"])
    assert main(["explain", run, "good film", "dull war", "--steps", "2", "--out", str(out)]) == 0
    first = sorted(p.name for p in out.iterdir())
    assert MARKER in first and len(first) == 3
    assert main(["explain", run, "good film", "dull war", "--steps", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == first
    capsys.readouterr()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(trained, tmp_path, capsys):
    """The page's script runs (it marks what it drew on <body>) and the screenshot is not blank."""
    out = tmp_path / "out"
    assert main(["explain", str(trained["bert-sentiment"]), "the film was good", "--steps", "4",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    page = next(out.glob("*/index.html")).resolve()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert re.search(r'data-rendered="self 0 mean"', dom), dom[:300]
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,900", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (900, 1000, 3) and pixels.std() > 20  # text, colours and the map, not a blank page
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).mean() > 0.001  # red/blue token colours are there
