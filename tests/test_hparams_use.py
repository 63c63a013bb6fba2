"""Every place that checks GMixout's hyperparameters reads the one table (gmixout_optim.hparams)."""
import numpy as np
import pytest
import torch

from gmixout_optim import GMixoutOptimizer, hparams

TABLE_MESSAGE = r"p.* must be a float in \[0, 1\) \(masking probability"


def _param():
    return torch.nn.Parameter(torch.randn(8))


def test_constructor_add_param_group_deepspeed_and_finetune_raise_the_table_message():
    from gmixout_optim.finetune.methods import method_params
    from gmixout_optim.integrations import deepspeed as gds

    with pytest.raises(ValueError, match=TABLE_MESSAGE):
        GMixoutOptimizer([_param()], p=1.5, lr=0.1)
    opt = GMixoutOptimizer([_param()], lr=0.1)
    with pytest.raises(ValueError, match=TABLE_MESSAGE + r".*got 1\.5"):
        opt.add_param_group({"params": [_param()], "p": 1.5})
    with pytest.raises(ValueError, match=TABLE_MESSAGE):
        gds.client_optimizer(p=1.5)
    with pytest.raises(ValueError, match=TABLE_MESSAGE):
        method_params("gmixout", {"p": 1.5})


def test_numpy_scalars_are_numbers_everywhere():
    opt = GMixoutOptimizer([_param()], p=np.float32(0.5), ema_decay=np.float64(0.25),
                           resample_every=np.int64(3), seed=np.int32(4), lr=0.1)
    opt.add_param_group({"params": [_param()], "p": np.float32(0.75), "resample_every": np.int64(2)})
    assert type(opt.defaults["p"]) is float and type(opt.defaults["resample_every"]) is int
    assert type(opt.param_groups[1]["resample_every"]) is int and opt.param_groups[1]["p"] == 0.75
    assert opt.seed == 4 and type(opt.seed) is int


def test_every_table_entry_has_a_check_that_can_fail():
    bad = {"gmixout": 1, "p": 1.0, "ema_decay": 1.5, "resample_every": 0, "merge": "mean",
           "state_policy": "keep", "seed": -1, "skip_nonfinite": "yes", "capture_grads": 1}
    assert set(bad) == set(hparams.HPARAMS)
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            hparams.check(name, value)
