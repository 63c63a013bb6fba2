"""Fine-tuning from a benchmark folder (a tiny fake CIFAR100-C) with a timm ViT and a CLIP model."""
import json
import pickle

import numpy as np
import pytest
import torch

from gmixout_optim.finetune import cli

TINY_CLIP = "gmixout-tiny-clip-runs"
TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
VIT_KW = "model_kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}"


def _fake_cifar100_c(root, n_train=12, n_test=6):
    """CIFAR-100 (torchvision's python pickles) and CIFAR-100-C (one corruption) with random images."""
    rng = np.random.default_rng(0)
    py = root / "cifar-100-python"
    py.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(py / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [k % 100 for k in range(n)]}, f)
    with open(py / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class {i}" for i in range(100)]}, f)
    cdir = root / "CIFAR-100-C"
    cdir.mkdir()
    np.save(cdir / "labels.npy", np.tile(np.arange(n_test) % 100, 5))
    np.save(cdir / "fog.npy", rng.integers(0, 256, (5 * n_test, 32, 32, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    torch.set_num_threads(1)
    return _fake_cifar100_c(tmp_path_factory.mktemp("cifar"))


def _train(tmp_path, root, model, *extra):
    out = tmp_path / "out"
    argv = ["--config", "configs/experiments/test_tiny.yaml", "--dataset", "cifar100-c", "--data-root", str(root),
            "--model", model, f"output_dir={out}", f"work_dir={out / 'work'}", "data.n_val=4", "data.num_workers=0",
            "data.n_train=null", "data.test_limit=null", "test_sets=null", "train.batch_size=4", "seeds=[0]",
            "search={}", *extra]
    assert cli.train_main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_vit_on_a_benchmark_folder(tmp_path, cifar):
    out, result = _train(tmp_path, cifar, "vit:vit_tiny_patch16_224", VIT_KW, "methods=[gmixout]")
    rec = result["runs"][0]
    # default test sets: the ID test split and every OOD split the folder provides
    assert list(rec["test"]) == ["test", *(f"cifar100-c:fog:{s}" for s in range(1, 6))]
    assert rec["model"]["num_classes"] == 100 and rec["model"]["class_names"][3] == "class 3"
    assert (out / "results.md").exists()


def test_clip_zero_shot_model_trains_and_evaluates_the_same(tmp_path, cifar, capsys):
    import open_clip

    path = tmp_path / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(path)
    out, result = _train(tmp_path, cifar, f"clip:{TINY_CLIP}", "methods=[full_ft]")
    rec = result["runs"][0]
    model = out / "work" / "runs" / "full_ft-default-s0" / "model.pt"
    scores = tmp_path / "scores.json"
    assert cli.evaluate_main(["--model", str(model), "--test-set", "cifar100-c:fog:3", "--json", str(scores),
                              "--threads", "1"]) == 0
    # rebuilt without the text tower, filled from model.pt: the same predictions as in the run
    assert json.loads(scores.read_text())["scores"]["cifar100-c:fog:3"] == rec["test"]["cifar100-c:fog:3"]


def test_missing_root_is_a_clear_error(tmp_path, capsys):
    """Checked before training: one line naming the expected layout, exit code 2 (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path, tmp_path, "efficientnet_lite0", "methods=[full_ft]")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cifar-100-python" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
