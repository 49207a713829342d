"""Energy in every run type: a short training run's metrics.jsonl rows (per log interval and per
evaluation, cumulative across a resume), its summary line and energy.png; evaluate, generate and
predict say their energy (generate and predict on standard error, standard output unchanged)."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
import yaml

from tformer.cli import main
from tformer.training.recipe import recipe_from_dict, train_recipe

WORDS = ["the", "king", "queen", "good", "bad", "love", "war", "lord", "my", "speaks", "of", "and"]
ENERGY = {"energy_j", "energy_kwh", "co2_g", "energy_method", "energy_source", "co2_country"}


def recipe(root: Path, max_steps: int) -> dict:
    return {"task": "causal_lm", "run_dir": str(root / "gpt"), "tokenizer": {"kind": "char"},
            "training": {"max_steps": max_steps, "batch_size": 4, "eval_every": 2, "eval_batches": 1,
                         "log_every": 1, "warmup_steps": 1, "device": "cpu"},
            "model": {"preset": "gpt-nano", "n_layers": 1, "d_model": 16, "n_heads": 2, "context_length": 16},
            "data": {"source": str(root / "corpus.txt"), "cache_dir": str(root / "cache")},
            "sample": {"tokens": 4, "prompt": "the"}}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Two steps, then a resume to four: the rows of both sessions."""
    root, rng = tmp_path_factory.mktemp("energy"), random.Random(0)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(200))
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = train_recipe(recipe_from_dict(recipe(root, 2)))
    rows_before = [json.loads(line) for line in (root / "gpt" / "metrics.jsonl").read_text().splitlines()]
    (root / "resume.yaml").write_text(yaml.safe_dump(recipe(root, 4)), encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()) as out:  # the second session as users run it
        assert main(["train", str(root / "resume.yaml")]) in (0, None)
    rows = [json.loads(line) for line in (root / "gpt" / "metrics.jsonl").read_text().splitlines()]
    return {"root": root, "dir": root / "gpt", "first": first, "train_output": out.getvalue(),
            "rows_before": rows_before, "rows": rows}


def test_every_log_and_evaluation_row_carries_labelled_cumulative_energy(run, monkeypatch):
    rows = run["rows"]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    for row in rows:
        assert ENERGY <= set(row), row
        assert row["energy_method"] == "estimated"  # no RAPL in these VMs
        assert row["energy_source"].startswith("cpu-time@")
        assert row["co2_country"] == "WORLD (no country given)"
        assert row["energy_kwh"] == pytest.approx(row["energy_j"] / 3.6e6)
        assert row["co2_g"] == pytest.approx(row["energy_kwh"] * row["co2_g_per_kwh"])
    logs = [r for r in rows if "train_loss" in r]
    assert all(r["tokens_per_j"] > 0 and r["examples_per_j"] > 0 for r in logs)
    energies = [r["energy_j"] for r in rows]
    assert energies == sorted(energies) and energies[0] > 0  # cumulative


def test_each_session_ends_with_its_total_and_a_resume_counts_on_from_it(run):
    first_total = run["rows_before"][-1]
    assert first_total["energy_total"] is True and first_total["step"] == 2
    assert first_total["energy_j"] == run["first"].energy.joules  # the summary's total, checkpoint included
    assert first_total["energy_j"] > max(r["energy_j"] for r in run["rows_before"][:-1])
    resumed = [r for r in run["rows"] if r["step"] > 2]
    assert resumed[0]["energy_j"] > first_total["energy_j"]  # counted on from the first session's total
    assert [r["step"] for r in run["rows"] if r.get("energy_total")] == [2, 4]


def test_the_summary_line_totals_and_the_energy_png(run):
    energy = run["first"].energy
    assert energy.method == "estimated" and energy.joules >= run["rows_before"][-1]["energy_j"]
    assert set(energy.per_joule()) == {"tokens_per_j", "examples_per_j"}
    line = run["train_output"].strip()
    assert line.startswith("done at step 4;") and line.count("\n") == 0
    assert "; energy " in line and "kWh, estimated: cpu-time@" in line and "tokens/J" in line
    assert "g CO2e at 483.18 g/kWh (WORLD (no country given), 2023)" in line
    assert (run["dir"] / "energy.png").stat().st_size > 0


def test_evaluate_prints_its_energy(run, capsys):
    main(["evaluate", str(run["dir"])])
    out = capsys.readouterr().out
    assert "val_loss" in out or "loss" in out
    assert "energy: energy " in out and "estimated: cpu-time@" in out and "g CO2e" in out


def test_generate_and_predict_report_energy_on_stderr_only(run, capsys, monkeypatch):
    monkeypatch.setenv("TFORMER_COUNTRY", "FR")
    main(["generate", str(run["dir"]), "--prompt", "the", "--max-new-tokens", "5", "--seed", "1"])
    out, err = capsys.readouterr()
    assert "energy" not in out and out.startswith("the")
    assert err.count("\n") == 1 and "estimated: cpu-time@" in err
    assert "tokens/J" in err and "(FR, 2023)" in err
    main(["predict", str(run["dir"]), "the king", "--max-new-tokens", "3", "--json", "--seed", "1"])
    out, err = capsys.readouterr()
    assert json.loads(out)["input"] == "the king" and "inputs/J" in err


def test_an_unknown_country_is_one_line(run, capsys, monkeypatch):
    monkeypatch.setenv("TFORMER_COUNTRY", "Atlantis")
    assert main(["evaluate", str(run["dir"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown country code 'Atlantis'") and err.count("\n") == 1


def test_country_flag_prices_the_run_and_bad_settings_clear_nothing(run, monkeypatch, capsys):
    """--country picks the carbon intensity; a bad code or power figure is one line, refused before
    the run directory changes (a --fresh start clears the old run only after every check)."""
    before = sorted(p.relative_to(run["dir"]) for p in run["dir"].rglob("*"))
    resume = str(run["root"] / "resume.yaml")
    assert main(["train", resume, "--fresh", "--country", "XX"]) == 2
    assert "unknown country code 'XX'" in capsys.readouterr().err
    monkeypatch.setenv("TFORMER_WATTS_PER_CORE", "-3")
    assert main(["train", resume, "--fresh"]) == 2
    assert "TFORMER_WATTS_PER_CORE='-3' is not a positive number" in capsys.readouterr().err
    monkeypatch.delenv("TFORMER_WATTS_PER_CORE")
    monkeypatch.setenv("TFORMER_COUNTRY", "nowhere")
    with pytest.raises(ValueError, match="unknown country code"):
        train_recipe(recipe_from_dict(recipe(run["root"], 4)), fresh=True)
    assert sorted(p.relative_to(run["dir"]) for p in run["dir"].rglob("*")) == before
    monkeypatch.delenv("TFORMER_COUNTRY")
    assert main(["evaluate", str(run["dir"]), "--country", "FR"]) == 0
    assert "g/kWh (FR, 2023)" in capsys.readouterr().out


def test_a_total_with_an_estimated_session_stays_an_estimate(run, tmp_path, monkeypatch):
    """Resumed on a machine whose RAPL counters are readable, the run's total still holds the
    earlier sessions' estimated joules: its rows say estimated (and why), never measured."""
    import shutil

    from tformer.energy import EnergyMeter

    root = tmp_path / "powercap"
    (root / "intel-rapl:0").mkdir(parents=True)
    for name, value in (("name", "package-0"), ("energy_uj", "100"), ("max_energy_range_uj", "10000000000")):
        (root / "intel-rapl:0" / name).write_text(value + "\n")
    real_open = EnergyMeter.open.__func__
    monkeypatch.setattr(EnergyMeter, "open", classmethod(lambda cls, **kw: real_open(cls, **{**kw, "powercap": root})))
    assert EnergyMeter.open().method == "measured"
    copy = tmp_path / "gpt"
    shutil.copytree(run["dir"], copy)
    settings = {**recipe(run["root"], 6), "run_dir": str(copy)}
    train_recipe(recipe_from_dict(settings))
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in rows if r["step"] > 4]
    assert later and all(r["energy_method"] == "estimated" for r in later)
    assert all(r["energy_source"].endswith("+earlier-estimated") for r in later)
