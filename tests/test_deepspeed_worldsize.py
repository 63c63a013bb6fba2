"""DeepSpeed ZeRO-3 checkpoints across world sizes (1 -> 2 and 2 -> 1, fp32 and bf16) and the
stage 0 + bf16 refusal at deepspeed.initialize (2 CPU ranks and 1, gloo).

Three launches (tests/distributed/ds_worldsize_worker.py): 1 rank saves; 2 ranks save and
load the 1-rank checkpoints; 1 rank loads the 2-rank checkpoints and tries stage 0 + bf16.
Every checkpoint folder holds two consolidated tags, "consolidated" and a newer "later"
with other weights: loading "consolidated" must give its weights, not the newest ones.

Tolerance: 0. A cross-world load copies the saved fp32 master weights (in bf16 runs too:
the masters are what training continues from, the 16-bit model weights are their rounding).
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "distributed"))
sys.path.insert(0, HERE)

import ds_common as C  # noqa: E402
from test_deepspeed import _launch, _record, comm_op  # noqa: E402,F401  (comm_op is a fixture)

NAMES = ["z3_fp32", "z3_bf16"]
WORKER = "ds_worldsize_worker.py"


@pytest.fixture(scope="module")
def runs(comm_op, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("dsws"))
    one, two = os.path.join(out, "w1"), os.path.join(out, "w2")
    _launch(1, {"save": NAMES}, one, WORKER)
    _launch(2, {"save": NAMES, "load": {n: os.path.join(one, f"ckpt_{n}_w1") for n in NAMES}}, two, WORKER)
    _launch(1, {"load": {n: os.path.join(two, f"ckpt_{n}_w2") for n in NAMES}, "stage0_bf16": True}, one, WORKER)
    return {"w1": one, "w2": two}


@pytest.mark.parametrize("saved_on, loaded_on", [(1, 2), (2, 1)])
@pytest.mark.parametrize("name", NAMES)
def test_consolidated_zero3_checkpoint_loads_its_tag_on_another_world_size(runs, name, saved_on, loaded_on):
    saved, _ = _record(runs, "save", name, saved_on)
    assert C.max_abs_diff(saved["later"], saved["consolidated"]) > 1e-3, "the two tags must differ"
    got, _ = _record(runs, "load", name, loaded_on)
    diff = C.max_abs_diff(got["loaded"], saved["consolidated"])
    assert diff == 0.0, f"{name}, {saved_on} -> {loaded_on} ranks: loaded fp32 masters differ by {diff:.3g}"
    assert C.max_abs_diff(got["continued"], got["loaded"]) > 1e-4, "training goes on after the load"


def test_stage0_bf16_is_refused_by_deepspeed_initialize(runs):
    _, meta = _record(runs, "check", "stage0_bf16", 1)
    err = meta["initialize_error"]
    assert err is not None, f"deepspeed.initialize accepted stage 0 + bf16; the first step then gave: {meta}"
    assert err.startswith("ValueError") and "stage 1" in err, err
