"""The comparison table (Markdown, CSV, JSON) and the ID-vs-OOD scatter plot (PNG).

Per method, over seeds: ID test accuracy, each OOD set, mean OOD (unweighted mean over the
OOD sets), training wall time, peak memory growth during training (RSS sampled every 5 ms,
see ``train.PeakRSS``), optimizer-state bytes (plus the method's own weight copies, e.g. the
EMA weights), and the hyperparameters picked on ID validation. Accuracies are in percent,
``mean ± std`` over seeds (sample std, ddof=1; 0 with one seed).

Against full fine-tuning (``BASELINE``): per-seed paired differences of ID and mean OOD
accuracy (same seed = same head init and data order) with their 95% t-interval over seeds
(``stats``), in the table and as error bars on the plot's second panel. The reference model
(of ``zero_shot`` and ``linear_probe``, the one with the higher ID accuracy: a head near chance
has an OOD/ID ratio near 1 that says nothing) is reported first with its OOD/ID ratio beside
full fine-tuning's: a benchmark where the reference's ratio is not above full FT's is flagged,
since keeping pretrained weights cannot be expected to help OOD there.
"""
from __future__ import annotations

import csv
import json
import os
import statistics

from . import stats

ID_SET = "test"
BASELINE = "full_ft"
REFERENCES = ("zero_shot", "linear_probe")  # the one of these with the higher ID accuracy is the reference


def _ms(values):
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(result: dict) -> list[dict]:
    """One row per method (in the order run): mean and std over seeds of every figure."""
    by_method = {}
    for rec in result["runs"]:
        by_method.setdefault(rec["method"], []).append(rec)
    rows = []
    for method, recs in by_method.items():
        # test@GROUP (ImageNet-LT's many/medium/few) are ID figures, not OOD sets
        extra = [n for n in recs[0]["test"] if n.startswith(ID_SET + "@")]
        # a corruption that left the images unchanged is the ID set again: not an OOD set
        left_out = set(result.get("unchanged_sets", []))
        ood_names = [n for n in recs[0]["test"] if n not in (ID_SET, "val") and n not in extra and n not in left_out]
        row = {"method": method, "seeds": [r["seed"] for r in recs], "ood_sets": ood_names, "id_extra": extra}
        for n in extra:
            row[n] = _ms(100 * r["test"][n] for r in recs)
        row["id"] = _ms(100 * r["test"][ID_SET] for r in recs) if ID_SET in recs[0]["test"] else (float("nan"), 0.0)
        for n in ood_names:
            row[n] = _ms(100 * r["test"][n] for r in recs)
        row["mean_ood"] = _ms(100 * stats.mean_ood(r, ood_names) for r in recs) if ood_names \
            else (float("nan"), 0.0)
        row["val"] = _ms(100 * r["val"] for r in recs)
        row["wall_s"] = _ms(r["train_wall_s"] for r in recs)
        probe = result.get("selection", {}).get(method, {}).get("probe_peak_mem_bytes")
        # a fresh-process probe when the experiment ran one (clean); else the in-run figures
        row["peak_mem_mb"] = (probe / 2**20, 0.0) if probe is not None else _ms(r["peak_mem_bytes"] / 2**20 for r in recs)
        row["state_mb"] = _ms(r["state_bytes"] / 2**20 for r in recs)
        row["trainable_params"] = recs[0]["trainable_params"]
        row["chosen"] = result.get("selection", {}).get(method, {}).get("chosen", {})
        row["lr"] = recs[0].get("hp", {}).get("lr")
        alphas = [r["extra"]["wise_alpha"] for r in recs if "wise_alpha" in r.get("extra", {})]
        if alphas:
            row["wise_alpha"] = alphas
        probe_c = [r["extra"]["lp_c"] for r in recs if "lp_c" in r.get("extra", {})]
        if probe_c:
            row["lp_c"] = probe_c
        soups = [len(r["extra"]["ingredients"]) for r in recs if method.startswith("soup_")]
        if soups:
            row["ingredients"] = soups
        rows.append(row)
    _add_paired(result["runs"], rows)
    return rows


def _add_paired(runs: list, rows: list) -> None:
    """``d_id`` / ``d_ood``: (mean, low, high, n seeds) of the per-seed differences to ``BASELINE``, in points."""
    if not any(r["method"] == BASELINE for r in rows):
        return
    for row in rows:
        ood = row["ood_sets"]
        for key, value in (("d_id", lambda rec: 100 * rec["test"][ID_SET]),
                           ("d_ood", lambda rec: 100 * stats.mean_ood(rec, ood))):
            diffs = stats.paired_differences(runs, row["method"], BASELINE, value)
            row[key] = (*stats.t_interval(diffs.values()), len(diffs)) if diffs else None
            row[key + "_per_seed"] = diffs


def reference_check(rows: list) -> dict | None:
    """The reference model's OOD/ID ratio against full fine-tuning's, or None without both rows."""
    by = {r["method"]: r for r in rows}
    refs = [m for m in REFERENCES if m in by]
    if not refs or BASELINE not in by:
        return None
    ref = max(refs, key=lambda m: by[m]["id"][0])  # ties: the first of REFERENCES
    others = {m: (by[m]["id"][0], by[m]["mean_ood"][0]) for m in refs if m != ref}
    ratio = {m: by[m]["mean_ood"][0] / by[m]["id"][0] if by[m]["id"][0] else float("nan") for m in (ref, BASELINE)}
    return {"reference": ref, "id": by[ref]["id"][0], "mean_ood": by[ref]["mean_ood"][0], "ratio": ratio[ref],
            "full_ft_ratio": ratio[BASELINE], "passes": ratio[ref] > ratio[BASELINE], "other_references": others}


def reference_sentence(check: dict | None) -> str:
    if check is None:
        return ("No reference row (zero_shot or linear_probe) beside full_ft: the benchmark's effective-robustness "
                "check could not be made.")
    verdict = ("above full fine-tuning's: the pretrained features are more robust than fine-tuned ones here, "
               "so this benchmark can show whether keeping them helps" if check["passes"] else
               "NOT above full fine-tuning's: FLAGGED, the pretrained model is not itself robust on these shifts, so "
               "this benchmark is no evidence for or against methods that keep pretrained weights")
    also = "".join(f" ({m}: ID {i:.1f}, mean OOD {o:.1f}; not the reference, lower ID.)"
                   for m, (i, o) in check.get("other_references", {}).items())
    return (f"**Reference first**: {check['reference']} ID {check['id']:.1f}, mean OOD {check['mean_ood']:.1f}, "
            f"OOD/ID {check['ratio']:.3f} against full FT's {check['full_ft_ratio']:.3f}: {verdict}.{also}")


def _interval(d) -> str:
    if d is None:
        return "-"
    mean, lo, hi, n = d
    if n < 2:
        return f"{mean:+.1f} (1 seed)"
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _short(name: str) -> str:
    return name.replace("corruption:", "").replace(":3", "@3") if name.startswith("corruption:") else name


def _fmt(ms, digits=1):
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    ood = rows[0]["ood_sets"] if rows else []
    extra = rows[0].get("id_extra", []) if rows else []
    paired = any(r.get("d_ood") is not None for r in rows)
    deltas = [f"ΔID vs {BASELINE} [95% CI]", f"ΔOOD vs {BASELINE} [95% CI]"] if paired else []
    head = ["method", "ID", *extra, *map(_short, ood), "mean OOD", *deltas, "train s", "peak MB", "state MB",
            "chosen on ID val"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        chosen = ", ".join(f"{k}={v}" for k, v in r["chosen"].items()) or \
            (f"none (lr={r.get('lr')} set in the config)" if r.get("lr") is not None else "none")
        if "wise_alpha" in r:
            chosen += f"; alpha={r['wise_alpha']}"
        if "lp_c" in r:
            chosen += f"; probe C={r['lp_c']}"
        if "ingredients" in r:
            chosen += f"; models in the soup per seed: {r['ingredients']}"
        d = [_interval(r.get("d_id")), _interval(r.get("d_ood"))] if paired else []
        cells = [r["method"], _fmt(r["id"]), *(_fmt(r[n]) for n in extra), *(_fmt(r[n]) for n in ood), f"**{_fmt(r['mean_ood'])}**", *d,
                 f"{r['wall_s'][0]:.0f}", f"{r['peak_mem_mb'][0]:.0f}", f"{r['state_mb'][0]:.1f}", chosen]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    ood = rows[0]["ood_sets"] if rows else []
    cols = ["id", *(rows[0].get("id_extra", []) if rows else []), *ood, "mean_ood", "val", "wall_s", "peak_mem_mb", "state_mb"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "n_seeds", *(f"{c}_{s}" for c in cols for s in ("mean", "std")), "trainable_params", "chosen"])
        for r in rows:
            w.writerow([r["method"], len(r["seeds"]), *(f"{x:.4f}" for c in cols for x in r[c]), r["trainable_params"],
                        json.dumps(r["chosen"], sort_keys=True)])


def _half_width(values) -> float:
    """Half-width of the 95% t-interval of the mean (0 with one value)."""
    mean, lo, hi = stats.t_interval(values)
    return 0.0 if lo != lo else (hi - lo) / 2.0


def plot(result: dict, rows: list[dict], path: str) -> None:
    """Left: ID (x) vs mean OOD (y), a dot per seed and a marker per method with 95% t-interval bars.

    Right (when full_ft ran): per method the mean paired difference to full FT, ΔID (x) vs ΔOOD
    (y), with the 95% t-intervals of the per-seed differences as error bars; the dashed lines
    are full FT itself.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = any(r.get("d_ood") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(12.8 if paired else 6.4, 5.2), dpi=120, squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xhp<>"
    labels = {}  # methods landing on the same point (e.g. WiSE-FT picking alpha=1) share one label
    for r in rows:
        labels.setdefault((round(r["id"][0], 2), round(r["mean_ood"][0], 2)), []).append(r["method"])
    for i, r in enumerate(rows):
        c, mk = colors[i % len(colors)], markers[i % len(markers)]
        recs = [x for x in result["runs"] if x["method"] == r["method"]]
        xs = [100 * x["test"][ID_SET] for x in recs]
        ys = [100 * stats.mean_ood(x, r["ood_sets"]) for x in recs]
        ax.scatter(xs, ys, s=12, color=c, marker=mk, alpha=0.45, linewidths=0)
        ax.errorbar(r["id"][0], r["mean_ood"][0], xerr=_half_width(xs), yerr=_half_width(ys), fmt=mk, ms=7,
                    color=c, capsize=3, label=f"{r['method']} ({len(recs)} seeds)", mfc="none" if i % 2 else c)
        key = (round(r["id"][0], 2), round(r["mean_ood"][0], 2))
        if labels.get(key, [None])[0] == r["method"]:
            ax.annotate(" = ".join(labels[key]), (r["id"][0], r["mean_ood"][0]), textcoords="offset points",
                        xytext=(6, 4), fontsize=7, color=c)
    ax.set_xlabel(f"ID accuracy (%) [{ID_SET}]")
    ax.set_ylabel(f"mean OOD accuracy (%) over {len(rows[0]['ood_sets']) if rows else 0} sets")
    ax.set_title(result.get("config", {}).get("name", "comparison") + ": mean over seeds, 95% t-intervals", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if paired:
        ax2 = axes[0][1]
        ax2.axhline(0.0, color="0.4", ls="--", lw=0.8)
        ax2.axvline(0.0, color="0.4", ls="--", lw=0.8)
        for i, r in enumerate(rows):
            if r["method"] == BASELINE or r.get("d_ood") is None:
                continue
            c, mk = colors[i % len(colors)], markers[i % len(markers)]
            (mx, lx, hx, n), (my, ly, hy, _) = r["d_id"], r["d_ood"]
            ex = [[mx - lx], [hx - mx]] if n > 1 else None
            ey = [[my - ly], [hy - my]] if n > 1 else None
            ax2.errorbar(mx, my, xerr=ex, yerr=ey, fmt=mk, ms=7, color=c, capsize=3, mfc="none" if i % 2 else c)
            ax2.annotate(r["method"], (mx, my), textcoords="offset points", xytext=(6, 4), fontsize=7, color=c)
        ax2.set_xlabel(f"ΔID vs {BASELINE} (points, paired by seed)")
        ax2.set_ylabel(f"Δ mean OOD vs {BASELINE} (points, paired by seed)")
        ax2.set_title("paired differences to full fine-tuning, 95% t-intervals over seeds", fontsize=9)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: dict, out_dir: str) -> dict:
    """Write results.md, results.csv, summary.json and id_vs_ood.png into ``out_dir``."""
    rows = summarize(result)
    check = reference_check(rows)
    os.makedirs(out_dir, exist_ok=True)
    cfg, machine = result.get("config", {}), result.get("machine", {})
    tr = cfg.get("train", {})
    md = [f"# {cfg.get('name', 'comparison')}", "",
          f"Model `{cfg.get('model')}` at {cfg.get('image_size')} px, {tr.get('steps')} steps of batch "
          f"{tr.get('batch_size')}, seeds {cfg.get('seeds')}; accuracies in %, mean ± std over seeds; "
          "hyperparameters chosen on the ID validation split only. Δ columns: mean over seeds of the per-seed "
          f"difference to {BASELINE} (same seed: same head init and data order), [95% t-interval].", "",
          reference_sentence(check), "",
          markdown_table(rows), "",
          *([f"Left out of the OOD sets (the corruption leaves these grey-scale images unchanged, so the set is "
             f"the ID test set again): {', '.join(result['unchanged_sets'])}.", ""] if result.get("unchanged_sets") else []),
          "`train s`: training wall time (incl. the method's finish step). `peak MB`: peak RSS growth during "
          "training (sampled every 5 ms after malloc_trim), "
          + (f"measured per method in a fresh process over {cfg['memory_probe_steps']} training steps"
             if cfg.get("memory_probe_steps") else
             f"measured during each run's {tr.get('steps')} training steps in the experiment's process (no fresh-process probe)")
          + " and the method's finish. `state MB`: optimizer state plus the method's extra weight copies "
          "(EMA weights; Mixout's anchor).", "",
          f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs ({machine.get('torch_threads')} torch "
          f"threads), {machine.get('platform')}, torch {machine.get('torch')}, timm {machine.get('timm')}. "
          f"Sum of the training wall times of the final runs: {sum(r['train_wall_s'] for r in result['runs']) / 60:.1f} min.", ""]
    sel = result.get("selection", {})
    if sel:
        md.append("ID-val search (val accuracy per candidate):")
        for m, s in sel.items():
            if s.get("note"):
                md.append(f"- {m}: {s['note']}")
                continue
            md.append(f"- {m} ({len(s['val_by_candidate'])} trained candidates): "
                      + "; ".join(f"{c or 'no search'} -> {100 * v:.1f}" for c, v in s["val_by_candidate"]))
        md.append("")
    md.append("![ID vs OOD](id_vs_ood.png)")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"rows": rows, "machine": machine, "selection": sel, "reference_check": check}, f, indent=1,
                  default=str)
    plot(result, rows, os.path.join(out_dir, "id_vs_ood.png"))
    return {"rows": rows}


if __name__ == "__main__":  # regenerate the report files from a results.json: python -m ...report PATH
    import sys

    path = sys.argv[1]
    with open(path) as f:
        write_report(json.load(f), os.path.dirname(os.path.abspath(path)))
