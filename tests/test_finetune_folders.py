"""Benchmark folder loaders on tiny fake folders built in each real layout.

Every fake image is a flat 8x8 colour whose red channel encodes the class index it was filed
under (``RED * index``), so a test can check that the label a loader gives matches the folder
the image came from, not only that the label list looks right.
"""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import ToTensor

from gmixout_optim.finetune.folders import LayoutError, load_benchmark

RED = 20  # red = RED * class index; 12 classes stay below 255


def _png(path, index):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), (RED * index, 7, 9), np.uint8)).save(path)
    return path


def _class_of(img: torch.Tensor) -> int:
    """Inverse of _png's colour code (ToTensor scales by 1/255; PNG is lossless)."""
    return int(round(float(img[0, 0, 0]) * 255 / RED))


def _assert_labels_match_images(ds):
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (3, 8, 8)
        assert _class_of(img) == label, f"item {i}: image of class {_class_of(img)} labelled {label}"


# ------------------------------------------------------------------------------------ ImageNet

WNIDS = [f"n{1000 + 7 * i:08d}" for i in range(12)]  # 12 classes: folder "10" sorts before "2"
R_IDX, A_IDX = [3, 7, 10], [0, 11]


def _imagenet_root(root):
    for i, w in enumerate(WNIDS):
        _png(root / "train" / w / f"{w}_0.JPEG", i)
        _png(root / "train" / w / f"{w}_1.JPEG", i)
        _png(root / "val" / w / f"val_{i}.JPEG", i)
        _png(root / "sketch" / w / f"sketch_{i}.JPEG", i)
        _png(root / "imagenetv2-matched-frequency-format-val" / str(i) / f"v2_{i}.jpeg", i)
    for i in R_IDX:
        _png(root / "imagenet-r" / WNIDS[i] / f"r_{i}.jpg", i)
    for i in A_IDX:
        _png(root / "imagenet-a" / WNIDS[i] / f"a_{i}.jpg", i)
    (root / "imagenet-a" / "README.txt").write_text("files beside the class folders are ignored")
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} name{i}, synonym{i}\n" for i, w in enumerate(WNIDS)))
    return root


def test_imagenet_splits_labels_and_subset_mapping(tmp_path):
    b = load_benchmark("imagenet", _imagenet_root(tmp_path), ToTensor())
    assert list(b.splits) == ["train", "test", "imagenet-v2", "imagenet-r", "imagenet-sketch", "imagenet-a"]
    assert b.id_test == "test" and b.ood_tests == ["imagenet-v2", "imagenet-r", "imagenet-sketch", "imagenet-a"]
    assert b.class_names == [f"name{i}" for i in range(12)] and b.groups is None
    assert [len(b.splits[s]) for s in b.splits] == [24, 12, 12, 3, 12, 2]
    for ds in b.splits.values():
        _assert_labels_match_images(ds)
    # V2 folders are class indices (lexicographic order would map "10" to 2); R/A land on the
    # 12-class indices of their wnids, and the subsets say which logits to score with.
    assert sorted(b.splits["imagenet-v2"].targets) == list(range(12))
    assert sorted(b.splits["imagenet-r"].targets) == R_IDX
    assert b.class_subsets == {"imagenet-r": R_IDX, "imagenet-a": A_IDX}


def test_imagenet_missing_folder_names_the_layout(tmp_path):
    root = _imagenet_root(tmp_path)
    for f in (root / "imagenet-a").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((root / "imagenet-a").rglob("*"), reverse=True):
        d.rmdir()
    (root / "imagenet-a").rmdir()
    with pytest.raises(LayoutError, match="imagenet-a/ not found") as err:
        load_benchmark("imagenet", root, ToTensor())
    assert "|-- imagenet-r/<wnid>/*.jpg" in str(err.value)  # the tree drawing comes with it
    # asking only for the splits that exist works, and the missing one is not touched
    b = load_benchmark("imagenet", root, ToTensor(), split_names=["test", "imagenet-r"])
    assert list(b.splits) == ["test", "imagenet-r"] and b.ood_tests == ["imagenet-r"]


def test_imagenet_bad_names_and_fallback_class_names(tmp_path):
    root = _imagenet_root(tmp_path)
    with pytest.raises(ValueError, match="unknown split.*imagenet-c.*known: train, test"):
        load_benchmark("imagenet", root, None, split_names=["imagenet-c"])
    with pytest.raises(ValueError, match="unknown benchmark 'imagenet21k'.*imagenet-lt"):
        load_benchmark("imagenet21k", root, None)
    with pytest.raises(LayoutError, match="data root not found"):
        load_benchmark("imagenet", tmp_path / "nope", None)
    (root / "LOC_synset_mapping.txt").unlink()
    with pytest.warns(UserWarning, match="class names are the wnids"):
        b = load_benchmark("imagenet", root, None, split_names=["imagenet-a"])
    assert b.class_names == WNIDS and b.class_subsets == {"imagenet-a": A_IDX}


def test_imagenet_full_1000_classes_get_clip_names(tmp_path):
    from open_clip import IMAGENET_CLASSNAMES

    root = _imagenet_root(tmp_path)
    for i in range(12, 1000):  # only the wnid list is read when train/ itself is not asked for
        (root / "train" / f"n{1000 + 7 * i:08d}").mkdir()
    b = load_benchmark("imagenet", root, ToTensor(), split_names=["imagenet-r"])
    assert b.class_names == list(IMAGENET_CLASSNAMES) and b.class_subsets == {"imagenet-r": R_IDX}


# --------------------------------------------------------------------------------- ImageNet-LT

LT_COUNTS = [101, 100, 20, 19, 1]  # many | medium (both edges) | few


def _imagenet_lt_root(root):
    lines = {"train": [], "val": [], "test": []}
    for i, count in enumerate(LT_COUNTS):
        w = WNIDS[i]
        # the lists may name one file many times; the counts come from the lines
        rel = [f"train/{w}/{w}_{k % 3}.JPEG" for k in range(count)]
        for r in set(rel):
            _png(root / r, i)
        lines["train"] += [f"{r} {i}" for r in rel]
        lines["val"].append(f"train/{w}/{w}_0.JPEG {i}")
        _png(root / "val" / w / f"v{i}.JPEG", i)
        lines["test"] += [f"val/{w}/v{i}.JPEG {i}"] * 2
    for s, ls in lines.items():
        (root / f"ImageNet_LT_{s}.txt").write_text("\n".join(ls) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} lt{i}\n" for i, w in enumerate(WNIDS)))
    return root


def test_imagenet_lt_groups_and_splits(tmp_path):
    b = load_benchmark("imagenet-lt", _imagenet_lt_root(tmp_path), ToTensor())
    assert b.groups == {"many": [0], "medium": [1, 2], "few": [3, 4]}
    assert [len(b.splits[s]) for s in ("train", "val", "test")] == [sum(LT_COUNTS), 5, 10]
    assert b.id_test == "test" and b.ood_tests == [] and b.class_names == [f"lt{i}" for i in range(5)]
    _assert_labels_match_images(b.splits["test"])
    _assert_labels_match_images(b.splits["val"])


def test_imagenet_lt_missing_list_and_missing_image(tmp_path):
    root = _imagenet_lt_root(tmp_path)
    (root / "ImageNet_LT_test.txt").unlink()
    with pytest.raises(LayoutError, match="ImageNet_LT_test.txt not found") as err:
        load_benchmark("imagenet-lt", root, None)
    assert "|-- ImageNet_LT_val.txt" in str(err.value)
    (root / "ImageNet_LT_test.txt").write_text(f"val/{WNIDS[0]}/gone.JPEG 0\n")
    with pytest.raises(LayoutError, match="image listed first in ImageNet_LT_test.txt"):
        load_benchmark("imagenet-lt", root, None)
    (root / "ImageNet_LT_test.txt").write_text(f"val/{WNIDS[0]}/v0.JPEG zero\n")
    with pytest.raises(ValueError, match=r"ImageNet_LT_test.txt:1: expected '<relative path> <integer label>'"):
        load_benchmark("imagenet-lt", root, None)


# ----------------------------------------------------------------------------------- DomainNet

DN_CLASSES = ["aircraft_carrier", "the_eiffel_tower", "zebra"]


def _domainnet_root(root, domains=("sketch", "real", "painting", "clipart")):
    for d, domain in enumerate(domains):
        train, test = [], []
        for i, c in enumerate(DN_CLASSES):
            for k in range(2):
                rel = f"{domain}/{c}/{domain}_{i:03d}_{k:06d}.jpg"
                _png(root / rel, i)
                (train if k == 0 else test).append(f"{rel} {i}")
        (root / f"{domain}_train.txt").write_text("\n".join(train) + "\n")
        (root / f"{domain}_test.txt").write_text("\n".join(test[: d + 1]) + "\n")  # sizes tell lists apart
    return root


def test_domainnet_splits_labels_names(tmp_path):
    b = load_benchmark("domainnet", _domainnet_root(tmp_path), ToTensor())
    assert list(b.splits) == ["train", "test", "real", "painting", "clipart"]
    assert b.ood_tests == ["real", "painting", "clipart"]
    assert b.class_names == ["aircraft carrier", "the eiffel tower", "zebra"]
    assert [len(ds) for ds in b.splits.values()] == [3, 1, 2, 3, 3]
    for name, ds in b.splits.items():
        _assert_labels_match_images(ds)
        domain = "sketch" if name in ("train", "test") else name
        assert all(p.parts[-3] == domain for p, _ in ds.samples)


def test_domainnet_missing_domain_list(tmp_path):
    root = _domainnet_root(tmp_path, domains=("sketch", "real", "painting"))
    with pytest.raises(LayoutError, match="clipart_test.txt not found") as err:
        load_benchmark("domainnet", root, None)
    assert "|-- sketch/<class>/*.jpg" in str(err.value)
    assert load_benchmark("domainnet", root, None, split_names=["train", "real"]).ood_tests == ["real"]


# ------------------------------------------------------------------------------------ iWildCam

WILDS_ROWS = [("train", 0), ("train", 4), ("train", 2), ("id_val", 4), ("id_test", 0),
              ("id_test", 2), ("val", 1), ("test", 1), ("test", 4), ("test", 0)]


def _iwildcam_root(root, categories=True):
    base = root / "iwildcam_v2.0"
    rows = ["split,location_remapped,y,filename"]
    for k, (split, y) in enumerate(WILDS_ROWS):
        _png(base / "train" / f"img{k:04d}.jpg", y)
        rows.append(f"{split},{k % 3},{y},img{k:04d}.jpg")
    (base / "metadata.csv").write_text("\n".join(rows) + "\n")
    if categories:
        (base / "categories.csv").write_text(
            "y,category_id,name\n0,0,empty\n1,3,tayassu pecari\n4,8,dasyprocta punctata\n")
    return root


def test_iwildcam_wilds_splits(tmp_path):
    b = load_benchmark("iwildcam", _iwildcam_root(tmp_path), ToTensor())
    assert list(b.splits) == ["train", "val", "test", "ood_test"] and b.ood_tests == ["ood_test"]
    assert [ds.targets for ds in b.splits.values()] == [[0, 4, 2], [4], [0, 2], [1, 4, 0]]
    assert b.class_names == ["empty", "tayassu pecari", "class 2", "class 3", "dasyprocta punctata"]
    for ds in b.splits.values():
        _assert_labels_match_images(ds)


def test_iwildcam_missing_metadata_and_images(tmp_path):
    with pytest.raises(LayoutError, match="iwildcam_v2.0/metadata.csv not found") as err:
        load_benchmark("iwildcam", tmp_path, None)
    assert "`-- train/<filename>" in str(err.value)
    root = _iwildcam_root(tmp_path, categories=False)
    (root / "iwildcam_v2.0" / "train" / "img0007.jpg").unlink()
    with pytest.raises(LayoutError, match="image img0007.jpg of split test"):
        load_benchmark("iwildcam", root, None, split_names=["ood_test"])
    assert load_benchmark("iwildcam", root, None, split_names=["train"]).class_names[1] == "class 1"


# --------------------------------------------------------------------------------- CIFAR-100-C

def _cifar_root(root, n_test=4, corruptions=("fog", "snow")):
    py = root / "cifar-100-python"
    py.mkdir(parents=True)
    for name, n in (("train", 6), ("test", n_test)):
        labels = [(3 * k) % 100 for k in range(n)]
        # torchvision's layout: rows of 3072 = R plane, G plane, B plane of 32x32
        data = np.zeros((n, 3, 32, 32), np.uint8)
        data[:, 0] = (np.array(labels) % 12 * RED)[:, None, None]
        with open(py / name, "wb") as f:
            pickle.dump({"data": data.reshape(n, -1), "fine_labels": labels}, f)
    with open(py / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    cdir = root / "CIFAR-100-C"
    cdir.mkdir()
    labels = np.tile((np.arange(n_test) * 7) % 100, 5)
    np.save(cdir / "labels.npy", labels)
    for c, name in enumerate(corruptions):
        img = np.zeros((5 * n_test, 32, 32, 3), np.uint8)
        img[..., 0] = np.arange(5 * n_test)[:, None, None]  # red = row index
        img[..., 1] = c
        np.save(cdir / f"{name}.npy", img)
    return root, labels


def test_cifar100_c_splits_and_severity_rows(tmp_path):
    root, labels = _cifar_root(tmp_path)
    b = load_benchmark("cifar100-c", root, None)
    assert b.class_names == [f"c{i}" for i in range(100)]
    assert b.ood_tests == [f"cifar100-c:{c}:{s}" for c in ("fog", "snow") for s in range(1, 6)]
    assert list(b.splits)[:2] == ["train", "test"] and len(b.splits["train"]) == 6
    img, y = b.splits["train"][5]
    assert y == 15 and np.asarray(img)[0, 0].tolist() == [15 % 12 * RED, 0, 0]
    ds = b.splits["cifar100-c:snow:3"]  # severity 3 = rows 8..11 of 20
    assert len(ds) == 4 and ds.targets == labels[8:12].tolist()
    assert [np.asarray(ds[k][0])[0, 0].tolist() for k in range(4)] == [[8 + k, 1, 0] for k in range(4)]


def test_cifar100_c_missing_pieces(tmp_path):
    root, _ = _cifar_root(tmp_path)
    with pytest.raises(ValueError, match=r"cifar100-c:rain:2.*NAME in \['fog', 'snow'\]"):
        load_benchmark("cifar100-c", root, None, split_names=["cifar100-c:rain:2"])
    (root / "CIFAR-100-C" / "labels.npy").unlink()
    with pytest.raises(LayoutError, match="CIFAR-100-C/labels.npy not found"):
        load_benchmark("cifar100-c", root, None, split_names=["cifar100-c:fog:1"])
    for f in (root / "CIFAR-100-C").iterdir():
        f.unlink()
    with pytest.raises(LayoutError, match=r"CIFAR-100-C/<corruption>.npy not found") as err:
        load_benchmark("cifar100-c", root, None)
    assert "|-- cifar-100-python/" in str(err.value)
    assert len(load_benchmark("cifar100-c", root, None, split_names=["test"]).splits["test"]) == 4
    (root / "cifar-100-python" / "test").unlink()
    with pytest.raises(LayoutError, match="cifar-100-python/test not found"):
        load_benchmark("cifar100-c", root, None, split_names=["test"])


def test_docs_show_every_layout_verbatim():
    """docs/benchmarks_data.md must draw the same trees as the error messages."""
    from pathlib import Path

    from gmixout_optim.finetune.folders import LAYOUTS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks_data.md").read_text()
    assert [name for name, tree in LAYOUTS.items() if tree not in doc] == []
