"""EfficientNet-Lite0 loading by tensor order, its new head, and the registry's errors."""
import numpy as np
import pytest
import torch
from torch import nn

from gmixout_optim.finetune import models as M


@pytest.fixture(scope="module")
def imagenet_model():
    torch.manual_seed(0)
    return M.build_efficientnet_lite0(imagenet_head=True).eval()


def test_every_packaged_tensor_lands_in_the_model(imagenet_model):
    source = M.load_efficientnet_lite0_state()
    target = imagenet_model.state_dict()
    assert len(source) == len(target) == 296
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        assert torch.equal(sv, tv), (sk, tk)


def test_pretrained_weights_recognise_a_cat_photo(imagenet_model):
    from skimage import data, transform

    img = transform.resize(data.chelsea(), (224, 224), anti_aliasing=True)  # RGB floats in [0, 1]
    x = torch.tensor((img - 0.5) / 0.5, dtype=torch.float32).permute(2, 0, 1)[None]
    with torch.no_grad():
        top = imagenet_model(x).argmax(-1).item()
    assert 281 <= top <= 285  # ImageNet's domestic-cat classes (tabby ... Egyptian cat)


def test_new_head_is_fresh_and_seeded():
    a = M.build_efficientnet_lite0(num_classes=10, head_seed=1)
    b = M.build_efficientnet_lite0(num_classes=10, head_seed=1)
    c = M.build_efficientnet_lite0(num_classes=10, head_seed=2)
    assert a.classifier.weight.shape == (10, 1280)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.equal(a.conv_stem.weight, c.conv_stem.weight)  # the backbone is the pretrained one


def test_load_by_order_names_the_mismatch():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    good = {"a": torch.ones(4, 3), "b": torch.ones(4), "c": torch.ones(2, 4), "d": torch.ones(2)}
    M.load_by_order(model, good)
    assert torch.equal(model[1].weight, torch.ones(2, 4))
    bad = dict(good, c=torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"tensor #2: pretrained 'c' has shape \(4, 2\), model '1.weight' expects \(2, 4\)"):
        M.load_by_order(model, bad)
    with pytest.raises(ValueError, match="has 3 tensors"):
        M.load_by_order(model, {k: good[k] for k in "abc"})


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'; allowed"):
        M.build_model("resnet50")
    with pytest.raises(ValueError, match="unknown model 'clip:'"):
        M.build_model("clip:")
    with pytest.raises(ValueError, match="class_names"):
        M.build_model("clip:ViT-B-32", class_names=None)


def test_build_model_info():
    model, info = M.build_model("efficientnet_lite0", num_classes=10)
    assert info.head_names == ["classifier"] and info.mean == (0.5, 0.5, 0.5)
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10) and np.isfinite(out.detach().numpy()).all()
