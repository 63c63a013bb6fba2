"""Methods built after training from the ``full_ft`` runs of an experiment, with no training of their own.

- ``soup_uniform`` (Wortsman et al. 2022, Model Soups): the plain average of the weights of every
  full-FT model of the search grid, trained with the same seed (same head init, same data order).
- ``soup_greedy``: the same ingredients sorted by ID-val accuracy (ties: grid order); starting
  from the best, each next one is kept if the soup's ID-val accuracy with it is at least the
  soup's without it (the paper's rule; ``greedy_soup``). Chosen on ID val only.
- ``wise_ft_fixed``: WiSE-FT at the fixed ``alpha`` its paper recommends (0.5):
  ``(1-alpha) W_pre + alpha W_ft`` on the backbone of the full-FT model that ID val chose, per
  seed; the new head keeps ``W_ft`` (it has no pretrained value).

So every seed gets the whole full-FT grid: the search trains it for the first seed, the other
seeds' grids are trained here (finished runs are reused by fingerprint, as everywhere). When
``train.recalibrate_bn`` is on, an averaged model's BatchNorm statistics are re-estimated on the
same ID train batches as every other run's before it is scored (averaged weights have no
matching statistics); otherwise the averaged statistics are kept.
"""
from __future__ import annotations

import os
import time

import torch

from .methods import POSTHOC, method_params


def average_state_dicts(state_dicts: list) -> dict:
    """Element-wise mean of floating-point tensors; integer buffers (BN's step counters) from the first."""
    if not state_dicts:
        raise ValueError("average_state_dicts needs at least one state dict")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys:
            raise ValueError(f"state dict #{i} has other keys than #0: models of different architectures")
    out = {}
    for k in keys:
        v = state_dicts[0][k]
        out[k] = torch.stack([sd[k].to(torch.float64) for sd in state_dicts]).mean(0).to(v.dtype) \
            if v.dtype.is_floating_point else v.clone()
    return out


def greedy_soup(ingredients: list, val_of) -> tuple[list, float]:
    """The greedy soup's ingredients and its ID-val accuracy.

    ``ingredients``: ``[(name, state_dict, own_val), ...]``; ``val_of(state_dict) -> float`` scores
    a (soup) state dict on ID val. Ingredients are tried best first (ties: the order given); one
    is kept when ``val_of(soup with it) >= val_of(soup without it)``.
    """
    if not ingredients:
        raise ValueError("greedy_soup needs at least one ingredient")
    order = sorted(range(len(ingredients)), key=lambda i: -ingredients[i][2])  # sorted() is stable: ties keep order
    chosen = [order[0]]
    best = val_of(average_state_dicts([ingredients[order[0]][1]]))
    for i in order[1:]:
        v = val_of(average_state_dicts([ingredients[j][1] for j in chosen + [i]]))
        if v >= best:
            chosen.append(i)
            best = v
    return [ingredients[i][0] for i in chosen], best


def interpolate(pretrained: dict, finetuned: dict, alpha: float, head_names) -> dict:
    """``(1-alpha) * pretrained + alpha * finetuned`` outside the head; head and non-float tensors from ``finetuned``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    heads = [h.rstrip(".") for h in head_names]
    out = {}
    for k, v in finetuned.items():
        pre = pretrained.get(k)
        in_head = any(k == h or k.startswith(h + ".") for h in heads)
        if v.dtype.is_floating_point and pre is not None and pre.shape == v.shape and not in_head:
            out[k] = torch.lerp(pre.to(v.dtype), v, alpha)
        else:
            out[k] = v.clone()
    return out


def check(cfg: dict) -> None:
    """Fail early when a post-hoc method is asked for without the full-FT runs it is built from."""
    wanted = [m for m in cfg["methods"] if m in POSTHOC]
    if not wanted:
        return
    if "full_ft" not in cfg["methods"]:
        raise ValueError(f"methods {wanted} are built from full_ft runs: add full_ft to methods")
    if any(m.startswith("soup_") for m in wanted):
        from .experiment import _grid
        if len(_grid(cfg["search"].get("full_ft", {}))) < 2:
            raise ValueError("soup_uniform / soup_greedy average the full_ft search grid's models: "
                             "search.full_ft must have at least 2 combinations")


class _Scorer:
    """ID-val accuracy of a state dict (after BN re-estimation when the config asks for it), one seed."""

    def __init__(self, cfg, model, info, seed):
        from .train import id_data_source

        self.cfg, self.model, self.info, self.seed = cfg, model, info, seed
        self.batches, self.val_accuracy = id_data_source(cfg, model, info, seed)
        self.recal = bool(cfg["train"].get("recalibrate_bn"))
        self.bn_batches = int(cfg["train"].get("bn_batches", 10))

    def load(self, sd: dict):
        self.model.load_state_dict(sd)
        if self.recal:  # a fresh stream per model: the same batches as train.recalibrate_saved_run draws
            from .data import TensorBatches
            from .train import _Tools, id_data_source

            b = self.batches
            fresh = TensorBatches(b.x, b.y, b.batch_size, self.seed, b.augment) if hasattr(b, "x") \
                else id_data_source(self.cfg, self.model, self.info, self.seed)[0]
            _Tools(self.val_accuracy, fresh, self.bn_batches).recalibrate_bn(self.model)
        return self.model

    def __call__(self, sd: dict) -> float:
        return self.val_accuracy(self.load(sd))


def _score_tests(cfg, work, model, rec):
    from . import data as D
    from . import folder_data
    from .evaluate import evaluate_sets, load_test_tensors

    m = rec["model"]
    if not D.is_embedded(cfg["data"]):
        return folder_data.evaluate_folder_sets(model, cfg["data"], cfg["test_sets"], m["image_size"], m["mean"],
                                                m["std"], cfg["data"].get("num_workers", 2))
    tensors = load_test_tensors(cfg["test_sets"], cfg["data"], m["image_size"], m["mean"], m["std"],
                                os.path.join(work, "cache"))
    return evaluate_sets(model, tensors, cfg["progress"])


def run_posthoc(cfg: dict, work: str, selection: dict) -> list:
    """Build, score and save every post-hoc method of ``cfg["methods"]`` for every seed; returns run records."""
    from .evaluate import load_saved_model
    from .experiment import _grid, _tag, _train
    from .models import ModelInfo, build_model
    from .train import write_record

    wanted = [m for m in cfg["methods"] if m in POSTHOC]
    base = cfg["method_params"].get("full_ft", {})
    combos = _grid(cfg["search"].get("full_ft", {}))
    chosen = selection["full_ft"]["chosen"]
    records = []
    for seed in cfg["seeds"]:
        ingredients = []  # (tag, run_dir, record)
        for combo in combos:
            run_dir = os.path.join(work, "runs", f"full_ft-{_tag(combo)}-s{seed}")
            ingredients.append((_tag(combo), run_dir, _train(cfg, "full_ft", {**base, **combo}, seed, run_dir)))
        model, meta = load_saved_model(os.path.join(ingredients[0][1], "model.pt"), cfg.get("device") or "cpu")
        mm = meta["model"]
        info = ModelInfo(mm["name"], [], tuple(mm["mean"]), tuple(mm["std"]))
        scorer = _Scorer(cfg, model, info, seed)
        sds = {tag: torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
               for tag, d, _ in ingredients}
        for method in wanted:
            t1 = time.perf_counter()
            if method == "soup_uniform":
                used = [tag for tag, _, _ in ingredients]
                sd = average_state_dicts([sds[t] for t in used])
            elif method == "soup_greedy":
                used, _ = greedy_soup([(tag, sds[tag], r["val"]) for tag, _, r in ingredients], scorer)
                sd = average_state_dicts([sds[t] for t in used])
            else:  # wise_ft_fixed: the chosen full-FT model of this seed against the pretrained weights
                alpha = float(method_params(method, cfg["method_params"].get(method))["alpha"])
                used = [_tag(chosen)]
                pre, pre_info = build_model(mm["name"], mm["num_classes"], mm.get("pretrained"), mm.get("class_names"),
                                            head_seed=seed, model_kwargs=mm.get("model_kwargs"))
                sd = interpolate(pre.state_dict(), sds[used[0]], alpha, pre_info.head_names)
            final = scorer.load(sd)
            used_recs = [r for tag, _, r in ingredients if tag in used]
            rec = {"method": method, "seed": seed, "hp": method_params(method, cfg["method_params"].get(method)),
                   "overrides": {}, "val": scorer.val_accuracy(final),
                   # the cost of a post-hoc model is the training of its ingredients plus its own build
                   "train_wall_s": sum(r["train_wall_s"] for r in used_recs) + time.perf_counter() - t1,
                   "steps": sum(r["steps"] for r in used_recs), "peak_mem_bytes": max(r["peak_mem_bytes"] for r in used_recs),
                   "state_bytes": max(r["state_bytes"] for r in used_recs),
                   "trainable_params": used_recs[0]["trainable_params"],
                   "extra": {"ingredients": used, "n_candidates": len(ingredients)},
                   "model": mm, "data": cfg["data"], "bn_recalibrated": scorer.recal}
            run_dir = os.path.join(work, "runs", f"{method}-s{seed}")
            os.makedirs(run_dir, exist_ok=True)
            torch.save({k: v.cpu() for k, v in final.state_dict().items()}, os.path.join(run_dir, "model.pt"))
            rec["test"] = _score_tests(cfg, work, final, rec)
            rec["test_sets"] = list(cfg["test_sets"])
            write_record(run_dir, rec)
            print(f"[posthoc] {method} seed {seed} ({len(used)} of {len(ingredients)} models): ID val "
                  f"{rec['val']:.4f}, " + ", ".join(f"{k} {v:.3f}" for k, v in rec["test"].items()), flush=True)
            records.append(rec)
    for method in wanted:
        selection[method] = {"chosen": {}, "val_by_candidate": [],
                             "note": "built from the full_ft grid of each seed (posthoc.py)"}
    return records

