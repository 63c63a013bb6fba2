"""Shared by the DeepSpeed worker (ds_worker.py) and tests/test_deepspeed.py.

A tiny model with odd-sized weights (so ZeRO pads), its data, the DeepSpeed configs the
tests run (configs/deepspeed/*.json with test-size overrides), and the single-process
reference: the plain GMixoutOptimizer stepping fp32 master weights the way DeepSpeed does.
"""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from gmixout_optim import GMixoutOptimizer, gmixout_param_groups

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO, "configs", "deepspeed")

MICRO = 4            # samples per micro-batch; a training step sees 2 micro-batches (8 samples)
PER_STEP = 2         # micro-batches per training step: 2 ranks x 1, or 1 rank x 2 (accumulation)
STEPS = 8            # training steps of the main run
SAVE_AT = 4          # checkpoint after step index 4 (4 real steps: inside episode 1)
NAN_AT = 2           # the loss of step index 2 is NaN: the step must be skipped, counting nothing
EXTRA = 2            # steps trained after a cross-world-size load
GMIXOUT_TEST_PARAMS = {"lr": 1e-2, "p": 0.7, "resample_every": 3}  # visible moves, episodes inside 8 steps
GROUP_WEIGHT_DECAY = 0.05


def make_model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(7, 13), act=nn.GELU(), norm=nn.LayerNorm(13), fc2=nn.Linear(13, 5)))


def make_data(steps: int = STEPS + EXTRA) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    x = torch.randn(steps, PER_STEP * MICRO, 7, generator=g)
    y = torch.randn(steps, PER_STEP * MICRO, 5, generator=g)
    return x, y


def micro_batch(x, y, step: int, index: int):
    sl = slice(index * MICRO, (index + 1) * MICRO)
    return x[step, sl], y[step, sl]


def loss_fn(out: torch.Tensor, target: torch.Tensor, step: int) -> torch.Tensor:
    loss = F.mse_loss(out.float(), target)
    return loss * float("nan") if step == NAN_AT else loss


def param_groups(model: nn.Module) -> list[dict]:
    return gmixout_param_groups(model, weight_decay=GROUP_WEIGHT_DECAY)


def load_config(name: str, world: int, **zero_overrides) -> dict:
    """A configs/deepspeed/*.json with test sizes: 8 samples per step, the test GMixout params."""
    with open(os.path.join(CONFIG_DIR, name)) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = MICRO
    cfg["gradient_accumulation_steps"] = PER_STEP // world
    cfg["train_batch_size"] = MICRO * PER_STEP
    cfg["optimizer"]["params"].update(GMIXOUT_TEST_PARAMS)
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["sub_group_size"] = 40              # several sub-groups per param group
        zero["stage3_param_persistence_threshold"] = 0
    zero.update(zero_overrides)
    cfg["steps_per_print"] = 10**9
    return cfg


def scenario_configs(world: int) -> dict[str, dict]:
    """Every scenario the 2-rank launch runs: name -> (config, route)."""
    fp32_z = lambda stage, **kw: load_config("zero1.json", world, stage=stage, **kw)  # noqa: E731
    out = {
        "z0_fp32": fp32_z(0),
        "z1_fp32": load_config("zero1.json", world),
        "z2_fp32": fp32_z(2),
        "z2_fp32_offload": fp32_z(2, offload_optimizer={"device": "cpu"}),
        "z1_bf16": fp32_z(1) | {"bf16": {"enabled": True}},
        "z1_bf16_fp32acc": fp32_z(1) | {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
        "z2_bf16": load_config("zero2_bf16.json", world),
        "z3_fp32": fp32_z(3, sub_group_size=40, stage3_param_persistence_threshold=0),
        "z3_bf16": load_config("zero3_bf16.json", world),
        "z3_bf16_offload": load_config("zero3_offload.json", world),
    }
    return out


# Which optimizer route each scenario takes (all three are exercised).
ROUTES = {"z1_fp32": "callable", "z2_fp32": "instance"}


def is_bf16(cfg: dict) -> bool:
    return bool((cfg.get("bf16") or {}).get("enabled"))


def stage_of(cfg: dict) -> int:
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


class Reference:
    """Single process, plain GMixoutOptimizer, DeepSpeed's arithmetic.

    Per step: the two micro-batch gradients g0, g1 are taken in the model's dtype, averaged
    as DeepSpeed averages them (g0/2 + g1/2: halving is exact, so the order of the 2-term
    sum does not matter), clipped by DeepSpeed's rule, and handed as fp32 to the
    optimizer that steps fp32 master weights; the model then gets the master weights cast
    to its dtype. The locator reproduces ZeRO-1/2's flat offsets for stages 1/2 and is the
    default (per-parameter keys) for stages 0/3, as the DeepSpeed locator promises.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.master = make_model()
        self.compute = self.master
        if is_bf16(cfg):  # DeepSpeed casts the model first, then copies it into fp32 masters
            self.compute = copy.deepcopy(self.master).to(torch.bfloat16)
            self.master = copy.deepcopy(self.compute).float()
        params = dict(cfg["optimizer"]["params"])
        self.opt = GMixoutOptimizer(param_groups(self.master), **params)
        if stage_of(cfg) in (1, 2):
            from gmixout_optim.integrations.deepspeed import zero12_layout_locator
            self.opt.set_locator(zero12_layout_locator(self.opt))
        self.clip = float(cfg.get("gradient_clipping", 0.0))
        self.x, self.y = make_data()

    def step(self, i: int) -> None:
        masters = list(self.master.parameters())
        grads = [torch.zeros_like(p) for p in self.compute.parameters()]
        for index in range(PER_STEP):
            xb, yb = micro_batch(self.x, self.y, i, index)
            self.compute.zero_grad(set_to_none=True)
            xb = xb.to(next(self.compute.parameters()).dtype)
            loss_fn(self.compute(xb), yb, i).backward()
            for acc, p in zip(grads, self.compute.parameters()):
                acc += p.grad / PER_STEP
        if not all(torch.isfinite(g).all() for g in grads):
            return  # DeepSpeed (overflow) or the core (skip_nonfinite) skips the whole step
        fp32 = [g.float() for g in grads]
        if self.clip > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in fp32])).item()
            coef = (norm + 1e-6) / self.clip
            if coef > 1:
                fp32 = [g / coef for g in fp32]
        for p, g in zip(masters, fp32):
            p.grad = g
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.compute is not self.master:
            with torch.no_grad():
                for c, m in zip(self.compute.parameters(), masters):
                    c.copy_(m)

    def run(self, start: int, stop: int) -> "Reference":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(start, stop):
                self.step(i)
        finally:
            torch.set_num_threads(threads)
        return self

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.master.named_parameters()}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def moved(a: dict, b: dict) -> float:
    """How far training moved the weights (same measure as the comparisons)."""
    return max_abs_diff(a, b)

