"""Checks of a DeepSpeed config (or a client optimizer's params) for GMixout, before DeepSpeed runs.

Re-exported by :mod:`gmixout_optim.integrations.deepspeed` (``check_config``); GMixout's own
keys are checked by :mod:`gmixout_optim.hparams`, the inner optimizer's by its signature.
"""
from __future__ import annotations

import inspect
import json
import math
import os

import torch

from gmixout_optim import GMixoutOptimizer, hparams

__all__ = ["NAME", "check_config", "check_params"]

NAME = "GMixout"


def _is_registered(name: str = NAME) -> bool:
    from . import deepspeed  # the registration lives there (imported lazily: it imports this module)
    return deepspeed.is_registered(name)


def check_config(config: dict | str | os.PathLike, *, client: bool = False, name: str = NAME) -> dict:
    """Explain, before DeepSpeed fails or silently swaps the optimizer, what a GMixout config lacks.

    ``config``: the DeepSpeed config dict or a JSON path. ``client=True`` when the optimizer
    is passed to ``deepspeed.initialize`` instead of named in the config; ``name``: the name
    given to ``register``. ``DeepSpeedGMixout`` runs it on the config of the engine that builds
    it (the registered and callable routes), so ``deepspeed.initialize`` refuses a bad config.
    Raises ``ValueError`` listing every problem; returns the GMixout ``params`` (``{}`` on the
    client route). Checked: the type name, the GMixout params (naming the bad value), the
    flags ZeRO needs for an optimizer it does not know, and the ZeRO settings under which
    supports would depend on the world size or state would be resliced as Adam's.
    """
    if not isinstance(config, dict):
        with open(config) as f:
            config = json.load(f)
    problems: list[str] = []
    opt_block = config.get("optimizer")
    params: dict = {}
    if client:
        if opt_block is not None:
            problems.append('an "optimizer" block and a client optimizer together: DeepSpeed would use the '
                            'client optimizer and ignore the block; remove one')
    else:
        typ = (opt_block or {}).get("type")
        if typ != name:
            hint = " (the name is case-sensitive)" if isinstance(typ, str) and typ.lower() == name.lower() else ""
            problems.append(f'optimizer.type is {typ!r}, expected "{name}"{hint}')
        elif not _is_registered(name):
            problems.append(f"torch.optim.{name} is not registered on this rank: call "
                            "gmixout_optim.integrations.deepspeed.register() before deepspeed.initialize")
        params = dict((opt_block or {}).get("params") or {})
        try:
            check_params(params, where="optimizer.params")
        except ValueError as err:
            problems.append(str(err))

    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        stage = 0
    if stage >= 1 and config.get("zero_allow_untested_optimizer") is not True:
        problems.append('ZeRO accepts only its own optimizers unless "zero_allow_untested_optimizer": true '
                        "(GMixout takes the flat fp32 partitions as they are)")
    half = any((config.get(k) or {}).get("enabled") for k in ("fp16", "bf16"))
    if stage == 0 and half:
        problems.append("fp16/bf16 without ZeRO wraps the optimizer in DeepSpeed's FP16_Optimizer, whose flat "
                        "groups the locator does not know; use zero_optimization.stage 1 (same memory, "
                        "supported)")
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device", "none")
    if device not in (None, "none"):
        if device != "cpu":
            problems.append(f'offload_optimizer.device={device!r}: only "cpu" is supported (the NVMe swapper '
                            "pages optimizer state as Adam's partition-shaped buffers)")
        if config.get("zero_force_ds_cpu_optimizer", True) is not False:
            problems.append('optimizer offload needs "zero_force_ds_cpu_optimizer": false, or DeepSpeed refuses '
                            "a client optimizer (and Accelerate silently swaps in DeepSpeedCPUAdam)")
        if float(offload.get("ratio", 1.0)) != 1.0:
            problems.append(f"offload_optimizer.ratio={offload['ratio']!r}: partial offload steps the rest "
                            "with a torch Adam behind GMixout's back; use 1.0")
    if zero.get("round_robin_gradients"):
        problems.append("zero_optimization.round_robin_gradients reorders the flat groups per world size, "
                        "so supports would change with the number of ranks; set it false")
    if zero.get("elastic_checkpoint"):
        problems.append("zero_optimization.elastic_checkpoint reslices optimizer state as if it were Adam's; "
                        "use consolidate() + load_checkpoint() of this module to change world size")
    for key in ("zero_hpz_partition_size", "mics_shard_size"):
        if int(zero.get(key, 1 if key == "zero_hpz_partition_size" else -1)) > 1:
            problems.append(f"zero_optimization.{key} > 1 partitions over a subgroup of ranks; not supported")
    if problems:
        raise ValueError("DeepSpeed config not usable with GMixout:\n  - " + "\n  - ".join(problems))
    return params


def check_params(params: dict, where: str) -> None:
    """Check a GMixout ``params`` block without building anything (ValueError names the value).

    GMixout's keys go through :mod:`gmixout_optim.hparams`; the inner optimizer's through
    its signature plus the few DeepSpeed refuses or misreads."""
    bad = []
    for key in [k for k in params if k in hparams.HPARAMS]:
        if key == "gmixout":
            bad.append(f"{where}.gmixout is a param-group key, not an optimizer argument")
            continue
        try:
            hparams.check(key, params[key])
        except ValueError as err:
            bad.append(f"{where}.{key}={params[key]!r}: {err}")

    def positive(key: str, lo_open: bool) -> None:
        if key in params:
            v = params[key]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not (ok and (v > 0 if lo_open else v >= 0)):
                bad.append(f"{where}.{key}={v!r} must be a number in {'(' if lo_open else '['}0, inf)")

    positive("lr", lo_open=False)
    positive("weight_decay", lo_open=False)
    positive("eps", lo_open=True)
    if "betas" in params:
        b = params["betas"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, (int, float)) and 0 <= x < 1
                                                                    for x in b)):
            bad.append(f"{where}.betas={b!r} must be two numbers in [0, 1)")
    if "max_grad_norm" in params:
        bad.append(f"{where}.max_grad_norm is refused by DeepSpeed; use the top-level \"gradient_clipping\"")
    inner = params.get("inner", "AdamW")
    cls = getattr(torch.optim, inner, None) if isinstance(inner, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or issubclass(cls, GMixoutOptimizer):
        bad.append(f"{where}.inner={inner!r} must name a torch.optim optimizer (e.g. \"AdamW\")")
    else:
        sig = inspect.signature(cls.__init__)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            accepted = set(sig.parameters) - {"self", "params"}
            ours = set(hparams.HPARAMS) | {"inner"}
            unknown = sorted(set(params) - accepted - ours)
            if unknown:
                bad.append(f"{where}: {unknown} are neither GMixout arguments {sorted(ours - {'gmixout'})} nor "
                           f"arguments of {inner} {sorted(accepted)}")
    if bad:
        raise ValueError("; ".join(bad))
