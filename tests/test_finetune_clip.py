"""CLIP zero-shot classifier and timm ViT builders, on tiny randomly initialised architectures.

Tolerances: the head is compared with the same fp32 text-tower math done by hand one class at a
time (open_clip batches classes, so the matmuls sum in another order); values are O(1) after
normalisation and O(exp(logit_scale)) = O(14) scaled, so 1e-5 relative is ~100x fp32 rounding
and far below any real error (a wrong template, missing normalisation or scale moves entries
by > 1e-2). Weights loaded from a checkpoint must be bit-identical (torch.equal).
"""
import json

import pytest
import torch

import open_clip  # the "examples" extra; installed wherever the fine-tuning tests run
import timm

from gmixout_optim.finetune.clip import build_clip_classifier, build_timm_vit

TINY = "gmixout-tiny-clip"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
CLASSES = ["cat", "dog", "red sports car"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "{}"]
TIMM_KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("clip_cfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random tiny CLIP saved as a local checkpoint, plus the model it came from."""
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None, pretrained_text=False).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # not the init value, so a dropped scale shows
    path = tmp_path_factory.mktemp("clip_ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _by_hand(model, classes, templates):
    """CLIP's zero-shot weights, one class at a time with the model's own encode_text."""
    tok = open_clip.get_tokenizer(TINY)
    rows = []
    with torch.no_grad():
        for c in classes:
            prompts = [t.format(c) if isinstance(t, str) else t(c) for t in templates]
            e = model.encode_text(tok(prompts))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            rows.append(m / m.norm())
    return torch.stack(rows)


def test_zero_shot_head_is_scaled_normalised_text_embeddings(source):
    model, path = source
    torch.manual_seed(1)  # a different random init underneath: only the checkpoint can match
    clf = build_clip_classifier(TINY, path, CLASSES, templates=TEMPLATES)
    expected = torch.exp(torch.tensor(2.5)) * _by_hand(model, CLASSES, TEMPLATES)
    torch.testing.assert_close(clf.head.weight, expected, rtol=RTOL, atol=ATOL)
    assert torch.equal(clf.head.bias, torch.zeros(3))
    # every row has norm exp(logit_scale): the normalisation of CLIP's classifier
    torch.testing.assert_close(clf.head.weight.norm(dim=1), torch.full((3,), 2.5).exp(), rtol=RTOL, atol=0)


def test_checkpoint_restores_image_tower_exactly_and_forward_matches_clip(source):
    model, path = source
    torch.manual_seed(2)
    clf = build_clip_classifier(TINY, path, CLASSES, templates=TEMPLATES)
    ref = model.visual.state_dict()
    got = clf.visual.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not any(k.startswith(("transformer.", "token_embedding")) for k in clf.state_dict())  # text tower gone
    clf.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = clf(x)
        # CLIP's own zero-shot logits: scale * <normalised image feature, w_c>
        expected = torch.exp(torch.tensor(2.5)) * model.encode_image(x, normalize=True) @ _by_hand(
            model, CLASSES, TEMPLATES).T
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, expected, rtol=RTOL, atol=1e-5)


def test_random_init_default_templates_and_wrapped_checkpoint(source, tmp_path):
    model, _ = source
    clf = build_clip_classifier(TINY, None, ["a", "b"])  # CLIP's 80 callable templates
    assert clf.head.weight.shape == (2, 32) and clf(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    assert clf.preprocess_cfg["size"] == (32, 32) and clf.transform(False) is not None
    # training scripts often save {"state_dict": {"module." + key: ...}}: open_clip's loader unwraps it
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    clf = build_clip_classifier(TINY, wrapped, CLASSES, templates=TEMPLATES[:1], zero_shot=True)
    torch.testing.assert_close(clf.head.weight, torch.exp(torch.tensor(2.5)) * _by_hand(model, CLASSES, TEMPLATES[:1]),
                               rtol=RTOL, atol=ATOL)
    blank = build_clip_classifier(TINY, wrapped, CLASSES, zero_shot=False)
    assert torch.equal(blank.head.weight, torch.zeros(3, 32))


def test_clip_errors(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="CLIP gmixout-tiny-clip weights file not found: .*nope.pt"):
        build_clip_classifier(TINY, tmp_path / "nope.pt", CLASSES)
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        build_clip_classifier("ViT-Q-99", None, CLASSES)
    with pytest.raises(ValueError, match="registered architecture name"):
        build_clip_classifier("hf-hub:laion/whatever", None, CLASSES)
    with pytest.raises(ValueError, match=r"have no '\{\}'"):
        build_clip_classifier(TINY, None, CLASSES, templates=["a photo"])
    with pytest.raises(ValueError, match="class_names must be a non-empty list"):
        build_clip_classifier(TINY, None, [])
    bad = tmp_path / "bad.pt"
    torch.save({"visual.proj": torch.zeros(3)}, bad)
    with pytest.raises(RuntimeError, match="bad.pt is not a state dict of open_clip model"):
        build_clip_classifier(TINY, bad, CLASSES)


# ------------------------------------------------------------------------------------- timm ViT

def test_timm_vit_loads_backbone_and_replaces_head(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, **TIMM_KW)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    model = build_timm_vit("vit_tiny_patch16_224", path, 7, **TIMM_KW)
    ref, got = src.state_dict(), model.state_dict()
    assert got["head.weight"].shape == (7, 64)
    backbone = [k for k in ref if not k.startswith("head.")]
    assert len(backbone) > 10 and all(torch.equal(got[k], ref[k]) for k in backbone)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # a checkpoint saved without a head (num_classes=0) loads the same way
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in ref.items() if not k.startswith("head.")}, headless)
    model = build_timm_vit("vit_tiny_patch16_224", headless, 3, **TIMM_KW)
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], ref["blocks.1.mlp.fc2.weight"])
    # another image size: timm's filter resamples the 4x4 position grid to 6x6 (class token kept)
    model = build_timm_vit("vit_tiny_patch16_224", path, 3, **{**TIMM_KW, "img_size": 48})
    assert model.pos_embed.shape == (1, 1 + 36, 64) and torch.equal(model.pos_embed[:, 0], ref["pos_embed"][:, 0])
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_timm_vit_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="timm vit_tiny_patch16_224 weights file not found"):
        build_timm_vit("vit_tiny_patch16_224", tmp_path / "missing.pth", 5, **TIMM_KW)
    with pytest.raises(ValueError, match="unknown timm model 'vit_nonexistent'"):
        build_timm_vit("vit_nonexistent", None, 5)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        build_timm_vit("vit_tiny_patch16_224", None, 0, **TIMM_KW)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TIMM_KW).state_dict()
    del src["blocks.0.attn.qkv.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(src, partial)
    with pytest.raises(ValueError, match=r"does not fit timm .*missing \['blocks.0.attn.qkv.weight'\]"):
        build_timm_vit("vit_tiny_patch16_224", partial, 5, **TIMM_KW)
