"""The paper's benchmarks, read from data folders the user already has (nothing is downloaded).

One entry point::

    bench = load_benchmark(name, root, transform, split_names=None)
    bench.splits        # {split name: torch Dataset of (image, label)}
    bench.class_names   # list[str], index = label
    bench.id_test       # the in-distribution test split's name (always "test")
    bench.ood_tests     # names of the out-of-distribution test splits that were built
    bench.groups        # ImageNet-LT only: {"many"|"medium"|"few": [class indices]}, else None
    bench.class_subsets # {split: [class indices]} for test sets covering only some classes
                        # (ImageNet-R / -A: score with the logits of those classes only)

Split names, per benchmark (``split_names`` picks a subset; the others are not touched, so a
missing folder only matters when one of its splits is asked for):

=============  ==================================================================================
imagenet       train, test (the ILSVRC-2012 val set), imagenet-v2, imagenet-r, imagenet-sketch,
               imagenet-a
imagenet-lt    train, val, test (the ImageNet_LT_*.txt lists); ``groups`` from the train counts:
               many-shot > 100 images, medium-shot 20..100, few-shot < 20
domainnet      train (sketch_train.txt), test (sketch_test.txt), real, painting, clipart
               (the ``<domain>_test.txt`` lists)
iwildcam       train, val (WILDS ``id_val``), test (WILDS ``id_test``), ood_test (WILDS ``test``);
               WILDS' OOD ``val`` split is not loaded (model selection never sees OOD data)
cifar100-c     train, test (CIFAR-100), ``cifar100-c:NAME:SEVERITY`` for every ``NAME.npy`` found
               and severity 1..5
=============  ==================================================================================

``splits["val"]`` exists only where the benchmark defines a validation split; elsewhere hold
one out of train. Every dataset keeps its ``transform`` in a ``.transform`` attribute that can
be reassigned (e.g. a train-time augmentation for ``splits["train"]`` only).
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["Benchmark", "LayoutError", "load_benchmark", "BENCHMARKS", "LAYOUTS"]


class Benchmark(NamedTuple):
    """What ``load_benchmark`` returns (fields described in the module docstring)."""

    splits: dict
    class_names: list
    id_test: str
    ood_tests: list
    groups: Optional[dict]
    class_subsets: Optional[dict] = None


class LayoutError(FileNotFoundError):
    """A file or folder of a benchmark's expected layout is missing; the message draws the layout."""


LAYOUTS = {
    "imagenet": """\
<root>/
|-- train/<wnid>/*.JPEG       ILSVRC-2012 train, one folder per class (n01440764, ...)
|-- val/<wnid>/*.JPEG         ILSVRC-2012 val, sorted into the same wnid folders
|-- imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg
|                             ImageNet-V2; folder name = class index
|-- imagenet-r/<wnid>/*.jpg   ImageNet-R (200 of the wnids)
|-- imagenet-a/<wnid>/*.jpg   ImageNet-A (200 of the wnids)
|-- sketch/<wnid>/*.JPEG      ImageNet-Sketch (all wnids)
`-- LOC_synset_mapping.txt    optional class names: "<wnid> <name>, <synonym>, ..." per line
                              (or torchvision's meta.bin); with all 1000 classes CLIP's curated
                              names from open_clip are used instead""",
    "imagenet-lt": """\
<root>/                       an ImageNet root (same train/ and val/ as for "imagenet")
|-- ImageNet_LT_train.txt     "<path relative to root> <label>" per line, e.g.
|-- ImageNet_LT_val.txt         train/n01440764/n01440764_10026.JPEG 0
|-- ImageNet_LT_test.txt        val/n01440764/ILSVRC2012_val_00000293.JPEG 0
|-- train/<wnid>/*.JPEG
|-- val/<wnid>/*.JPEG
`-- LOC_synset_mapping.txt    optional class names (as for "imagenet")""",
    "domainnet": """\
<root>/
|-- sketch/<class>/*.jpg      one folder per domain, one subfolder per class
|-- real/<class>/*.jpg
|-- painting/<class>/*.jpg
|-- clipart/<class>/*.jpg
|-- sketch_train.txt          "<domain>/<class>/<file>.jpg <label>" per line
|-- sketch_test.txt
|-- real_test.txt
|-- painting_test.txt
`-- clipart_test.txt""",
    "iwildcam": """\
<root>/
`-- iwildcam_v2.0/            the WILDS release
    |-- metadata.csv          columns include split (train, id_val, id_test, val, test), y, filename
    |-- categories.csv        optional class names: columns y, name
    `-- train/<filename>      every image of every split""",
    "cifar100-c": """\
<root>/
|-- cifar-100-python/         CIFAR-100, python version (torchvision's layout)
|   |-- train
|   |-- test
|   `-- meta
`-- CIFAR-100-C/
    |-- labels.npy            (5*N,) labels, the N test labels repeated for severities 1..5
    `-- <corruption>.npy      (5*N, 32, 32, 3) uint8; severity s = rows (s-1)*N .. s*N-1""",
}
BENCHMARKS = tuple(LAYOUTS)


def _need(path: Path, benchmark: str, what: str) -> Path:
    """Return ``path`` if it exists, else raise a LayoutError that draws the expected layout."""
    if not path.exists():
        raise LayoutError(
            f"{benchmark}: {what} not found at {path}.\n"
            f"Expected layout (symlink your folders into it if they are named differently):\n"
            f"{LAYOUTS[benchmark]}"
        )
    return path


# ---------------------------------------------------------------------------------- datasets

def _image_folder(root: Path, transform, class_to_idx: Optional[dict] = None):
    """torchvision ImageFolder; with ``class_to_idx`` the folder -> label map is fixed (a subset
    of a larger label space, or folders named by index) instead of the sorted folder order."""
    from torchvision.datasets import ImageFolder

    if class_to_idx is None:
        return ImageFolder(str(root), transform=transform)

    class _Fixed(ImageFolder):
        def find_classes(self, directory):
            classes, _ = super().find_classes(directory)
            unknown = [c for c in classes if c not in class_to_idx]
            if unknown:
                raise ValueError(
                    f"{directory}: class folders {unknown[:5]} are not among the "
                    f"{len(class_to_idx)} classes of the training set"
                )
            return classes, {c: class_to_idx[c] for c in classes}

    return _Fixed(str(root), transform=transform)


class ListDataset(Dataset):
    """Images listed as ``(path, label)`` pairs (ImageNet-LT, DomainNet, iWildCam), PIL -> RGB."""

    def __init__(self, samples: Sequence[tuple], transform=None):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        img = default_loader(str(path))
        return (self.transform(img) if self.transform is not None else img), label


class ArrayDataset(Dataset):
    """Rows of a uint8 ``(N, H, W, 3)`` array (memory-mapped) as PIL images (CIFAR-100-C)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.targets, self.transform = images, [int(y) for y in labels], transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(np.ascontiguousarray(self.images[i]))
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


def _read_list(path: Path, root: Path, benchmark: str) -> list:
    """``<relative path> <label>`` lines -> [(root/relative path, label)]; checks the first image
    exists so that a list pointing into the wrong root fails here, not mid-epoch."""
    samples = []
    for n, line in enumerate(_need(path, benchmark, path.name).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected '<relative path> <integer label>', got {line!r}")
        samples.append((root / parts[0], int(parts[1])))
    if not samples:
        raise ValueError(f"{path} lists no images")
    _need(samples[0][0], benchmark, f"image listed first in {path.name}")
    return samples


def _names_from_paths(samples: list, num_classes: int, source: str) -> list:
    """Class name of each label = the folder holding its images (must agree across images)."""
    names: dict = {}
    for path, label in samples:
        folder = Path(path).parent.name
        if names.setdefault(label, folder) != folder:
            raise ValueError(f"{source}: label {label} is used for folders {names[label]!r} and {folder!r}")
    return [names.get(i, f"class {i}") for i in range(num_classes)]


# ------------------------------------------------------------------------------ ImageNet family

def _imagenet_names(root: Path, wnids: list) -> list:
    """Readable names for CLIP prompts. The full 1000 classes: CLIP's curated ImageNet names
    (shipped with open_clip, in the sorted-wnid order; they give far better zero-shot heads than
    WordNet lemmas). Otherwise LOC_synset_mapping.txt, else torchvision's meta.bin, else the
    wnids themselves (with a warning: zero-shot heads built from wnids are meaningless)."""
    if len(wnids) == 1000:
        try:
            from open_clip import IMAGENET_CLASSNAMES

            return list(IMAGENET_CLASSNAMES)
        except ImportError:  # open_clip is optional; fall through to the files
            pass
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.exists():
        table = {}
        for line in mapping.read_text().splitlines():
            wnid, _, rest = line.strip().partition(" ")
            if wnid:
                table[wnid] = rest.split(",")[0].strip() or wnid
        return [table.get(w, w) for w in wnids]
    if (root / "meta.bin").exists():
        from torchvision.datasets.imagenet import load_meta_file

        wnid_to_classes = load_meta_file(str(root))[0]
        return [wnid_to_classes[w][0] if w in wnid_to_classes else w for w in wnids]
    warnings.warn(f"no LOC_synset_mapping.txt or meta.bin in {root}: class names are the wnids")
    return list(wnids)


def _imagenet(root: Path):
    from torchvision.datasets.folder import find_classes

    ref = root / "train" if (root / "train").is_dir() else _need(root / "val", "imagenet", "train/ (or val/)")
    wnids, wnid_to_idx = find_classes(str(ref))  # sorted wnids = the standard 1000-class order
    folders = {"train": "train", "test": "val", "imagenet-v2": "imagenetv2-matched-frequency-format-val",
               "imagenet-r": "imagenet-r", "imagenet-sketch": "sketch", "imagenet-a": "imagenet-a"}
    by_index = {str(i): i for i in range(len(wnids))}
    maps = {"imagenet-v2": by_index, "imagenet-r": wnid_to_idx, "imagenet-a": wnid_to_idx,
            "imagenet-sketch": wnid_to_idx, "test": wnid_to_idx}

    def builder(split):
        return lambda tf: _image_folder(_need(root / folders[split], "imagenet", f"{folders[split]}/"),
                                        tf, maps.get(split))

    def subset(ds):  # the 1000-class indices a 200-class test set covers
        return sorted(set(ds.class_to_idx.values()))

    return dict(builders={s: builder(s) for s in folders}, class_names=_imagenet_names(root, wnids),
                ood=["imagenet-v2", "imagenet-r", "imagenet-sketch", "imagenet-a"], groups=None,
                subsets={"imagenet-r": subset, "imagenet-a": subset})


def _imagenet_lt(root: Path):
    lists = {s: _read_list(root / f"ImageNet_LT_{s}.txt", root, "imagenet-lt") for s in ("train", "val", "test")}
    num_classes = 1 + max(y for samples in lists.values() for _, y in samples)
    counts = np.bincount([y for _, y in lists["train"]], minlength=num_classes)
    groups = {"many": np.flatnonzero(counts > 100).tolist(),
              "medium": np.flatnonzero((counts >= 20) & (counts <= 100)).tolist(),
              "few": np.flatnonzero(counts < 20).tolist()}
    wnids = _names_from_paths(lists["train"] + lists["val"] + lists["test"], num_classes, "ImageNet_LT lists")
    return dict(builders={s: (lambda tf, s=s: ListDataset(lists[s], tf)) for s in lists},
                class_names=_imagenet_names(root, wnids), ood=[], groups=groups, subsets={})


# ----------------------------------------------------------------------- DomainNet, iWildCam

_DOMAINNET = {"train": "sketch_train", "test": "sketch_test", "real": "real_test",
              "painting": "painting_test", "clipart": "clipart_test"}


def _domainnet(root: Path):
    _need(root, "domainnet", "root folder")
    # class names come from the train list's folders, so it is read even for test-only loads
    train = _read_list(root / "sketch_train.txt", root, "domainnet")
    num_classes = 1 + max(y for _, y in train)
    names = [n.replace("_", " ") for n in _names_from_paths(train, num_classes, "sketch_train.txt")]

    def builder(split):
        if split == "train":
            return lambda tf: ListDataset(train, tf)
        return lambda tf: ListDataset(_read_list(root / f"{_DOMAINNET[split]}.txt", root, "domainnet"), tf)

    return dict(builders={s: builder(s) for s in _DOMAINNET}, class_names=names,
                ood=["real", "painting", "clipart"], groups=None, subsets={})


_WILDS_SPLITS = {"train": "train", "val": "id_val", "test": "id_test", "ood_test": "test"}


def _iwildcam(root: Path):
    base = root / "iwildcam_v2.0"
    with open(_need(base / "metadata.csv", "iwildcam", "iwildcam_v2.0/metadata.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"split", "y", "filename"} - set(rows[0] if rows else ())
    if missing:
        raise ValueError(f"{base / 'metadata.csv'}: missing columns {sorted(missing)} (WILDS iwildcam_v2.0 format)")
    num_classes = 1 + max(int(r["y"]) for r in rows)  # WILDS' own convention (182 classes)
    names = [f"class {i}" for i in range(num_classes)]
    if (base / "categories.csv").exists():
        with open(base / "categories.csv", newline="") as f:
            for r in csv.DictReader(f):
                if "y" in r and "name" in r and r["y"].isdigit() and int(r["y"]) < num_classes:
                    names[int(r["y"])] = r["name"]
    images = _need(base / "train", "iwildcam", "iwildcam_v2.0/train/ (the image folder)")

    def builder(split):
        def build(tf):
            samples = [(images / r["filename"], int(r["y"])) for r in rows if r["split"] == _WILDS_SPLITS[split]]
            if not samples:
                raise ValueError(f"{base / 'metadata.csv'} has no rows with split == {_WILDS_SPLITS[split]!r}")
            _need(samples[0][0], "iwildcam", f"image {samples[0][0].name} of split {_WILDS_SPLITS[split]}")
            return ListDataset(samples, tf)
        return build

    return dict(builders={s: builder(s) for s in _WILDS_SPLITS}, class_names=names,
                ood=["ood_test"], groups=None, subsets={})


# ----------------------------------------------------------------------------------- CIFAR-100-C

def _cifar100(root: Path, train: bool, transform):
    from torchvision.datasets import CIFAR100

    class _LocalCIFAR100(CIFAR100):
        # md5 None = torchvision's check_integrity only checks the file exists: the real files'
        # sums would cost a full read per construction and reject re-packed or test copies.
        train_list = [["train", None]]
        test_list = [["test", None]]
        meta = {**CIFAR100.meta, "md5": None}

    for name in ("train", "test", "meta"):
        _need(root / "cifar-100-python" / name, "cifar100-c", f"cifar-100-python/{name}")
    return _LocalCIFAR100(str(root), train=train, transform=transform, download=False)


def _cifar100_c(root: Path):
    cdir = root / "CIFAR-100-C"
    corruptions = sorted(p.stem for p in cdir.glob("*.npy") if p.stem != "labels") if cdir.is_dir() else []
    meta = root / "cifar-100-python" / "meta"
    if meta.exists():
        import pickle

        with open(meta, "rb") as f:
            names = list(pickle.load(f, encoding="latin1")["fine_label_names"])
    else:
        names = None  # resolved from the train split if it gets built; else an error below

    def corrupted(corruption, severity):
        def build(tf):
            labels = np.load(_need(cdir / "labels.npy", "cifar100-c", "CIFAR-100-C/labels.npy"))
            images = np.load(_need(cdir / f"{corruption}.npy", "cifar100-c", f"CIFAR-100-C/{corruption}.npy"),
                             mmap_mode="r")  # 150 MB per corruption: read rows on demand
            if len(images) != len(labels) or len(labels) % 5:
                raise ValueError(f"{cdir / corruption}.npy has {len(images)} rows and labels.npy {len(labels)}: "
                                 "expected the same multiple of 5 (severities 1..5 stacked)")
            n = len(labels) // 5
            rows = slice((severity - 1) * n, severity * n)
            return ArrayDataset(images[rows], labels[rows], tf)
        return build

    builders = {"train": lambda tf: _cifar100(root, True, tf), "test": lambda tf: _cifar100(root, False, tf)}
    ood = [f"cifar100-c:{c}:{s}" for c in corruptions for s in range(1, 6)]
    builders.update({name: corrupted(name.split(":")[1], int(name.split(":")[2])) for name in ood})

    def check(wanted):  # the corrupted sets are the point of the benchmark: no silent empty list
        if not corruptions and (wanted is None or any(s.startswith("cifar100-c:") for s in wanted)):
            _need(cdir / "<corruption>.npy", "cifar100-c", "CIFAR-100-C/<corruption>.npy")

    return dict(builders=builders, class_names=names, ood=ood, groups=None, subsets={},
                pattern=("cifar100-c:NAME:SEVERITY", corruptions), check=check)


_LOADERS: dict = {"imagenet": _imagenet, "imagenet-lt": _imagenet_lt, "domainnet": _domainnet,
                  "iwildcam": _iwildcam, "cifar100-c": _cifar100_c}


def load_benchmark(name: str, root, transform: Optional[Callable] = None,
                   split_names: Optional[Sequence[str]] = None) -> Benchmark:
    """Load benchmark ``name`` from ``root`` (layouts in ``LAYOUTS``; docs/benchmarks_data.md).

    ``transform`` is applied to every split's PIL images. ``split_names`` (default: all) picks
    the splits to build; an unknown name raises ValueError listing the known ones, a missing
    file or folder raises LayoutError (a FileNotFoundError) drawing the expected layout.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    root = Path(root).expanduser()
    _need(root, name, "data root")
    spec = _LOADERS[name](root)
    builders = spec["builders"]
    spec.get("check", lambda _: None)(split_names)
    wanted = list(builders) if split_names is None else list(split_names)
    unknown = [s for s in wanted if s not in builders]
    if unknown:
        known = [s for s in builders if s not in spec["ood"] or "pattern" not in spec] + (
            [f"{spec['pattern'][0]} with NAME in {spec['pattern'][1]} and SEVERITY in 1..5"]
            if "pattern" in spec else [])
        raise ValueError(f"{name}: unknown split(s) {unknown}; known: {', '.join(known)}")
    splits = {s: builders[s](transform) for s in wanted}
    class_names = spec["class_names"]
    if class_names is None:  # CIFAR-100 meta missing: only reachable for -C-only loads
        _need(root / "cifar-100-python" / "meta", name, "cifar-100-python/meta (class names)")
    subsets = {s: f(splits[s]) for s, f in spec["subsets"].items() if s in splits}
    return Benchmark(splits=splits, class_names=list(class_names), id_test="test",
                     ood_tests=[s for s in spec["ood"] if s in splits], groups=spec["groups"],
                     class_subsets=subsets or None)
