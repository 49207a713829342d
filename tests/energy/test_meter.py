"""The meter's sources against fakes: a powercap tree in tmp_path (package zones summed, subzones
and psys left out, a counter that wraps), a fake pynvml module, and the CPU-time estimate, which
is always labelled as one. The carbon table: codes, the world default flagged, unknown codes."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from tformer.energy import EnergyMeter, carbon
from tformer.energy.sources import WATTS_PER_CORE, CpuTimeSource, RaplSource, visible_gpu


def zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = 1_000_000) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "name").write_text(label + "\n")
    (folder / "energy_uj").write_text(f"{energy_uj}\n")
    (folder / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return folder


def set_energy(folder: Path, energy_uj: int) -> None:
    (folder / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path / "powercap"
    root.mkdir()
    (root / "intel-rapl").mkdir()  # the control type folder, not a zone
    zones = {"pkg0": zone(root, "intel-rapl:0", "package-0", 100),
             "pkg1": zone(root, "intel-rapl:1", "package-1", 900_000),
             "core0": zone(root, "intel-rapl:0:0", "core", 50),  # part of package-0
             "dram0": zone(root, "intel-rapl:0:1", "dram", 70),
             "psys": zone(root, "intel-rapl:2", "psys", 10)}  # the platform: overlaps packages
    return root, zones


def test_rapl_sums_package_zones_only_and_handles_wraparound(powercap):
    root, zones = powercap
    rapl = RaplSource.find(root)
    assert [z.name for z in rapl.zones] == ["intel-rapl:0", "intel-rapl:1"]
    set_energy(zones["pkg0"], 300_100)  # +300 000 uJ
    set_energy(zones["pkg1"], 50_000)  # wrapped: 900 000 -> 1 000 000 -> 50 000 = +150 000 uJ
    for other in ("core0", "dram0", "psys"):
        set_energy(zones[other], 999_999)
    assert rapl.joules() == pytest.approx(0.45)
    set_energy(zones["pkg1"], 60_000)  # +10 000 uJ after the wrap
    assert rapl.joules() == pytest.approx(0.46)


def test_rapl_reads_amd_zones_and_refuses_unreadable_trees(tmp_path):
    root = tmp_path / "amd"
    root.mkdir()
    assert RaplSource.find(root) is None  # no zones
    assert RaplSource.find(tmp_path / "absent") is None
    z = zone(root, "amd-rapl:0", "package-0", 5)
    (z / "energy_uj").write_text("not a number")
    assert RaplSource.find(root) is None  # unreadable: the meter falls back to the estimate


def test_the_meter_labels_rapl_measured_and_its_absence_estimated(powercap, tmp_path):
    root, zones = powercap
    measured = EnergyMeter.open(powercap=root, country="FR")
    set_energy(zones["pkg0"], 600_100)  # +0.6 J
    reading = measured.reading()
    assert (reading.method, reading.source) == ("measured", "rapl")
    assert reading.joules == pytest.approx(0.6)
    assert reading.doing(tokens=6).fields()["tokens_per_j"] == pytest.approx(10)
    assert reading.doing(0.2, tokens=6).per_joule() == {"tokens_per_j": pytest.approx(30)}
    assert reading.co2_g == pytest.approx(0.6 / 3.6e6 * carbon.intensity("FR").g_per_kwh)
    estimated = EnergyMeter.open(powercap=tmp_path / "absent")
    row = estimated.reading().fields()
    assert row["energy_method"] == "estimated"
    assert row["energy_source"] == f"cpu-time@{WATTS_PER_CORE:g}W/core"
    other_rank = EnergyMeter.open(powercap=root, local_rank=1)
    assert other_rank.joules() == 0 and other_rank.source == "rapl@local-rank-0"


def test_cpu_time_estimate_is_seconds_times_watts(monkeypatch):
    clock = iter([10.0, 12.5])
    source = CpuTimeSource(4.0, cpu_seconds=lambda: next(clock))
    assert source.joules() == pytest.approx(10.0)
    monkeypatch.setenv("TFORMER_WATTS_PER_CORE", "3")
    assert "cpu-time@3W/core" in EnergyMeter.open(powercap=Path("/nonexistent")).source
    monkeypatch.setenv("TFORMER_WATTS_PER_CORE", "lots")
    with pytest.raises(ValueError, match="TFORMER_WATTS_PER_CORE='lots' is not a positive number"):
        EnergyMeter.open()
    with pytest.raises(ValueError, match="positive"):
        CpuTimeSource(0.0)


def test_the_estimate_follows_this_process_cpu_time():
    source = CpuTimeSource(1.0)
    total = sum(i * i for i in range(300_000))  # some CPU work
    assert total > 0 and source.joules() > 0


def fake_pynvml(counter_mj: list[int], fail: bool = False) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.indices = []
    nvml.nvmlInit = lambda: None

    def handle(index):
        if fail:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        nvml.indices.append(index)
        return f"gpu{index}"

    nvml.nvmlDeviceGetHandleByIndex = handle
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: counter_mj[0]
    return nvml


def test_nvml_counter_is_measured_and_adds_to_the_cpu(monkeypatch, powercap):
    root, zones = powercap
    counter = [5_000]
    nvml = fake_pynvml(counter)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    meter = EnergyMeter.open(gpu_index=1, powercap=root)
    assert nvml.indices == [3]  # cuda:1 is the machine's GPU 3
    counter[0] = 12_500  # +7.5 J on the GPU
    set_energy(zones["pkg0"], 100 + 500_000)  # +0.5 J on the CPU
    reading = meter.reading()
    assert (reading.method, reading.source) == ("measured", "nvml+rapl")
    assert reading.joules == pytest.approx(8.0)
    no_rapl = EnergyMeter.open(gpu_index=0, powercap=root / "absent")
    assert (no_rapl.method, no_rapl.source.split("@")[0]) == ("estimated", "nvml+cpu-time")


def test_without_nvml_the_gpu_is_not_claimed_measured(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([0], fail=True))
    meter = EnergyMeter.open(gpu_index=0, powercap=tmp_path)
    assert meter.source.startswith("cpu-time") and meter.method == "estimated"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert EnergyMeter.open(gpu_index=0, powercap=tmp_path).method == "estimated"
    assert visible_gpu(0) == 0


def test_a_gpu_without_nvml_makes_even_rapl_readings_estimates(monkeypatch, powercap):
    """RAPL counts the CPU package only: a GPU run whose GPU cannot be read is not 'measured'."""
    root, _ = powercap
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert EnergyMeter.open(powercap=root).method == "measured"  # a CPU run: RAPL is all of it
    meter = EnergyMeter.open(gpu_index=0, powercap=root)
    assert meter.method == "estimated" and "gpu-not-counted" in meter.source
    other_rank = EnergyMeter.open(gpu_index=1, powercap=root, local_rank=1)
    assert other_rank.method == "estimated" and "gpu-not-counted" in other_rank.source


def test_carbon_codes_world_default_and_unknown_country(monkeypatch):
    monkeypatch.delenv("TFORMER_COUNTRY", raising=False)
    france = carbon.intensity("fr")
    assert france == carbon.intensity("FRA") and france.chosen and france.country == "France"
    assert 0 < france.g_per_kwh < carbon.intensity("PL").g_per_kwh  # nuclear/hydro vs coal
    world = carbon.intensity()
    assert not world.chosen and world.label == "WORLD (no country given)" and world.year == 2023
    assert carbon.intensity("WORLD").label == "WORLD"
    monkeypatch.setenv("TFORMER_COUNTRY", "DE")
    assert carbon.intensity().country == "Germany"
    with pytest.raises(ValueError) as error:
        carbon.intensity("XX")
    message = str(error.value)
    assert "\n" not in message and "'XX'" in message and "carbon_intensity.csv" in message
    assert carbon.grams_co2e(3.6e6, france) == pytest.approx(france.g_per_kwh)


def test_summary_line_names_method_source_and_country(tmp_path):
    reading = EnergyMeter.open(powercap=tmp_path, country="SE").reading(7200.0)
    line = reading.doing(tokens=14400).summary()
    assert line.startswith("energy 7.2 kJ (0.002 kWh, estimated: cpu-time@")
    assert "(SE, 2023)" in line and "2 tokens/J" in line
