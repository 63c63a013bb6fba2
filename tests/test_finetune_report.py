"""Report: means and spreads over seeds, the Markdown/CSV/JSON files and the plot, from known numbers."""
import csv
import json
import statistics

import pytest

from gmixout_optim.finetune import report as R


def _rec(method, seed, id_acc, ood, val=0.9):
    return {"method": method, "seed": seed, "val": val, "train_wall_s": 10.0 + seed, "peak_mem_bytes": 2**20 * 100,
            "state_bytes": 2**20 * 3, "trainable_params": 1000, "extra": {},
            "test": {"test": id_acc, "digits": ood[0], "corruption:fog:3": ood[1]}}


@pytest.fixture
def result():
    runs = [_rec("full_ft", 0, 0.95, (0.40, 0.20)), _rec("full_ft", 1, 0.97, (0.44, 0.30)),
            _rec("gmixout", 0, 0.96, (0.50, 0.30))]
    runs[2]["extra"] = {"wise_alpha": 0.5}
    return {"config": {"name": "t", "model": "m", "image_size": 32, "seeds": [0, 1], "train": {"steps": 2, "batch_size": 8}},
            "selection": {"full_ft": {"chosen": {"lr": 0.001}, "val_by_candidate": [[{"lr": 0.001}, 0.9]]}},
            "runs": runs, "machine": {"processor": "x", "cpu_count": 2}, "total_wall_s": 60}


def test_summary_means_and_sample_std(result):
    rows = R.summarize(result)
    full = rows[0]
    assert full["method"] == "full_ft" and full["ood_sets"] == ["digits", "corruption:fog:3"]
    assert full["id"][0] == pytest.approx(96.0) and full["id"][1] == pytest.approx(statistics.stdev([95, 97]))
    # mean OOD per seed first (30.0 and 37.0), then over seeds
    assert full["mean_ood"][0] == pytest.approx(33.5) and full["mean_ood"][1] == pytest.approx(statistics.stdev([30, 37]))
    assert full["chosen"] == {"lr": 0.001}
    g = rows[1]
    assert g["mean_ood"] == (pytest.approx(40.0), 0.0) and g["wise_alpha"] == [0.5]
    assert g["state_mb"][0] == pytest.approx(3.0) and g["peak_mem_mb"][0] == pytest.approx(100.0)


def test_files_are_written_and_agree(result, tmp_path):
    R.write_report(result, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "| full_ft | 96.0 ± 1.4 | 42.0 ± 2.8 | 25.0 ± 7.1 | **33.5 ± 4.9** |" in md
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["method"] == "gmixout" and float(rows[1]["mean_ood_mean"]) == pytest.approx(40.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["full_ft", "gmixout"]
    png = (tmp_path / "id_vs_ood.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
