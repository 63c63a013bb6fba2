"""The paper's benchmarks from local folders (``folders.load_benchmark``) in the training loop.

``data.dataset`` names the benchmark (imagenet, imagenet-lt, domainnet, iwildcam,
cifar100-c) and ``data.root`` its folder. ID validation: the benchmark's own ``val`` split
where it has one (ImageNet-LT, iWildCam's ``id_val``), else ``n_val`` images held out of
``train`` with ``data.seed`` (and left out of training). Test sets are the benchmark's split
names; the default is ``test`` plus every OOD split it provides. Sets covering only some
classes (ImageNet-R / -A) are scored on those classes' logits; ImageNet-LT's ``test`` also
reports ``test@many``, ``test@medium``, ``test@few``.
"""
from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader, Subset

HAS_VAL = {"imagenet-lt", "iwildcam"}


def image_transform(model, image_size: int, mean, std, train: bool):
    """CLIP's own transform when the model has one; else resize + crop (+ flip in training)."""
    if hasattr(model, "transform"):
        return model.transform(is_train=train)
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size), *norm])


def class_names(data_cfg: dict) -> list:
    from .folders import load_benchmark

    return load_benchmark(data_cfg["dataset"], data_cfg["root"], None, split_names=["test"]).class_names


class LoaderBatches:
    """Endless mini-batches from a DataLoader (reshuffled every pass)."""

    def __init__(self, loader):
        self.loader, self._it = loader, iter(loader)

    def next(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)


class FolderData:
    """ID train batches and validation accuracy for a benchmark folder."""

    def __init__(self, cfg: dict, model, info, seed: int):
        from .folders import load_benchmark

        d, tr = cfg["data"], cfg.get("train", {})
        name, root = d["dataset"], d["root"]
        size = cfg["image_size"]
        train_tf = image_transform(model, size, info.mean, info.std, True)
        eval_tf = image_transform(model, size, info.mean, info.std, False)
        train = load_benchmark(name, root, train_tf, split_names=["train"]).splits["train"]
        if name in HAS_VAL:
            val = load_benchmark(name, root, eval_tf, split_names=["val"]).splits["val"]
            train_idx = list(range(len(train)))
        else:  # hold out n_val training images (same images for every run with this data seed)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(d.get("seed", 0))).tolist()
            n_val = min(int(d.get("n_val", 500)), len(train) // 2)
            # the train split again with the eval transform: a shallow copy, not a second scan of
            # the folder (every dataset in folders.py applies ``self.transform`` in __getitem__)
            eval_train = copy.copy(train)
            eval_train.transform = eval_tf
            val = Subset(eval_train, order[:n_val])
            train_idx = sorted(order[n_val:])
        if d.get("n_train"):
            train_idx = train_idx[: int(d["n_train"])]
        workers = int(d.get("num_workers", 2))
        batch_size = int(tr.get("batch_size", 32))
        loader = DataLoader(Subset(train, train_idx), batch_size=batch_size, shuffle=True,
                            drop_last=len(train_idx) > batch_size, num_workers=workers,
                            generator=torch.Generator().manual_seed(seed))
        self.batches = LoaderBatches(loader)
        self.val_loader = DataLoader(val, batch_size=128, num_workers=workers)

    def val_accuracy(self, model) -> float:
        return loader_accuracy(model, self.val_loader)[0]


@torch.no_grad()
def loader_accuracy(model, loader, subset=None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Top-1 accuracy; with ``subset`` (class indices) only those logits compete. Also returns labels, hits."""
    was = model.training
    model.eval()
    labels, hits = [], []
    sub = torch.as_tensor(subset) if subset is not None else None
    device = next(model.parameters()).device
    for x, y in loader:
        logits = model(x.to(device)).cpu()
        pred = sub[logits[:, sub].argmax(-1)] if sub is not None else logits.argmax(-1)
        labels.append(y)
        hits.append(pred == y)
    model.train(was)
    labels, hits = torch.cat(labels), torch.cat(hits)
    return hits.float().mean().item() if len(hits) else 0.0, labels, hits


def evaluate_folder_sets(model, data_cfg: dict, names, image_size: int, mean, std, workers: int = 2) -> dict:
    """{set name: accuracy} on benchmark splits (plus ``test@many/medium/few`` for ImageNet-LT)."""
    from .folders import load_benchmark

    tf = image_transform(model, image_size, mean, std, False)
    bench = load_benchmark(data_cfg["dataset"], data_cfg["root"], tf, split_names=list(names))
    out = {}
    for name, ds in bench.splits.items():
        subset = (bench.class_subsets or {}).get(name)
        acc, labels, hits = loader_accuracy(model, DataLoader(ds, batch_size=128, num_workers=workers), subset)
        out[name] = acc
        if bench.groups and name == bench.id_test:
            for group, classes in bench.groups.items():
                mask = torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))
                out[f"{name}@{group}"] = hits[mask].float().mean().item() if mask.any() else float("nan")
    return out


def default_test_sets(data_cfg: dict) -> list:
    """``test`` and every OOD split the benchmark folder provides."""
    from .folders import load_benchmark

    bench = load_benchmark(data_cfg["dataset"], data_cfg["root"], None)
    return [bench.id_test, *bench.ood_tests]
