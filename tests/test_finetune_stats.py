"""Paired differences against full fine-tuning, their t-interval, and the reference check of the report."""
import math

import pytest

from gmixout_optim.finetune import report as R
from gmixout_optim.finetune import stats as S

T_2_975 = 4.302652729911275  # Student t quantile, 2 degrees of freedom, 0.975 (printed tables: 4.303)
T_4_975 = 2.7764451051977987  # 4 degrees of freedom (tables: 2.776)


def test_t_interval_matches_a_hand_computation():
    values = [1.0, 2.0, 4.0]
    mean = 7.0 / 3.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = T_2_975 * sd / math.sqrt(3)
    m, lo, hi = S.t_interval(values)
    assert m == pytest.approx(mean) and lo == pytest.approx(mean - half) and hi == pytest.approx(mean + half)
    # a wider level gives a wider interval; one value gives none
    assert S.t_interval(values, 0.99)[1] < lo
    m1, lo1, hi1 = S.t_interval([3.0])
    assert m1 == 3.0 and math.isnan(lo1) and math.isnan(hi1)


@pytest.mark.parametrize("bad", [[], "level"])
def test_t_interval_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="at least one value" if bad == [] else "level"):
        S.t_interval([] if bad == [] else [1.0, 2.0], level=0.95 if bad == [] else 1.5)


def _rec(method, seed, id_acc, oods):
    return {"method": method, "seed": seed, "val": id_acc, "train_wall_s": 1.0, "peak_mem_bytes": 0, "state_bytes": 0,
            "trainable_params": 1, "hp": {"lr": 1e-3},
            "test": {"test": id_acc, **{f"ood{i}": v for i, v in enumerate(oods)}}}


def test_paired_differences_pair_by_seed_and_drop_unpaired_seeds():
    runs = [_rec("full_ft", 0, 0.9, [0.5]), _rec("full_ft", 1, 0.8, [0.4]),
            _rec("gmixout", 1, 0.85, [0.6]), _rec("gmixout", 0, 0.9, [0.5]), _rec("gmixout", 7, 0.1, [0.1])]
    d = S.paired_differences(runs, "gmixout", "full_ft", lambda r: r["test"]["ood0"])
    assert list(d) == [0, 1] and d[0] == pytest.approx(0.0) and d[1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="two runs with seed 0"):
        S.paired_differences(runs + [_rec("full_ft", 0, 0.9, [0.5])], "gmixout", "full_ft", lambda r: 0.0)


def _experiment(ref_id, ref_oods):
    # five seeds; gmixout's mean OOD differs from full FT's by known per-seed amounts
    runs, deltas = [], [0.02, 0.04, 0.00, 0.06, 0.03]
    for s, dlt in enumerate(deltas):
        runs.append(_rec("full_ft", s, 0.90 + 0.01 * s, [0.50 + 0.01 * s, 0.30]))
        runs.append(_rec("gmixout", s, 0.90 + 0.01 * s - 0.005, [0.50 + 0.01 * s + 2 * dlt, 0.30]))
        runs.append(_rec("linear_probe", s, ref_id, ref_oods))
    return {"config": {"name": "t", "seeds": list(range(5))}, "runs": runs}, deltas


def test_report_rows_carry_the_paired_interval_of_mean_ood():
    result, deltas = _experiment(0.8, [0.6, 0.4])
    rows = {r["method"]: r for r in R.summarize(result)}
    per_seed = [100 * d for d in deltas]  # mean over the two sets of (+2*delta, 0) = +delta, in points
    mean = sum(per_seed) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in per_seed) / 4)
    m, lo, hi, n = rows["gmixout"]["d_ood"]
    assert n == 5 and m == pytest.approx(mean)
    assert lo == pytest.approx(mean - T_4_975 * sd / math.sqrt(5)) and hi == pytest.approx(mean + T_4_975 * sd / math.sqrt(5))
    assert rows["gmixout"]["d_id"][0] == pytest.approx(-0.5)
    assert rows["full_ft"]["d_ood"][:3] == (0.0, 0.0, 0.0)
    table = R.markdown_table(list(rows.values()))
    assert "ΔOOD vs full_ft [95% CI]" in table and f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]" in table


def test_reference_check_passes_only_when_its_ood_id_ratio_is_above_full_ft():
    robust, _ = _experiment(0.8, [0.6, 0.4])       # ratio 0.5/0.8 = 0.625 > full FT's ~0.43
    fragile, _ = _experiment(0.9, [0.2, 0.1])      # ratio 0.15/0.9 = 0.17
    ok = R.reference_check(R.summarize(robust))
    bad = R.reference_check(R.summarize(fragile))
    assert ok["reference"] == "linear_probe" and ok["passes"] and ok["ratio"] == pytest.approx(0.5 / 0.8)
    assert not bad["passes"] and "FLAGGED" in R.reference_sentence(bad) and "FLAGGED" not in R.reference_sentence(ok)
    assert R.reference_sentence(None).startswith("No reference row")


def test_a_chance_level_zero_shot_head_is_not_the_reference():
    result, _ = _experiment(0.8, [0.6, 0.4])
    # zero-shot at chance: OOD/ID near 1 would "pass" trivially; the linear probe (higher ID) is the reference
    result["runs"] += [_rec("zero_shot", s, 0.1, [0.1, 0.1]) for s in range(5)]
    check = R.reference_check(R.summarize(result))
    assert check["reference"] == "linear_probe" and check["other_references"] == {"zero_shot": pytest.approx((10.0, 10.0))}
    assert "zero_shot: ID 10.0" in R.reference_sentence(check)


def test_write_report_puts_the_reference_first_and_draws_both_panels(tmp_path):
    result, _ = _experiment(0.9, [0.2, 0.1])
    R.write_report(result, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert md.index("Reference first") < md.index("| method |") and "FLAGGED" in md
    assert (tmp_path / "id_vs_ood.png").stat().st_size > 10_000
