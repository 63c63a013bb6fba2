"""Fine-tune a timm or open_clip vision model with GMixout under ``accelerate launch``.

Launch lines (CPU, 2 processes; GPU: drop ACCELERATE_USE_CPU) are in docs/accelerate.md, e.g.::

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/cpu_ddp.yaml \
        examples/accelerate_finetune.py --model vit_tiny_patch16_224 --data-dir DATA --steps 500

Data: an ImageFolder (``--data-dir``) or, by default, seeded synthetic images (for smoke
tests). Weights: ``--checkpoint`` loads local pretrained weights (nothing is downloaded).
The optimizer is GMixout on the Linear/Conv weights, dense AdamW on the rest
(``gmixout_param_groups``). The global batch of every step is split across processes by
rank, so ``--reference N`` (one process, no Accelerate, N data-parallel ranks emulated by
per-rank backward passes with the loss divided by N) trains the same weights; the tests use
it. ``--save-at K --state-dir DIR`` saves the Accelerate state at step K and, after the
last step, loads it back and replays steps K+1.. to check the round trip.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from gmixout_optim import GMixoutOptimizer, gmixout_param_groups

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under runpy.run_path (the tests)
from _vision_model import build_model  # noqa: E402  (shared with deepspeed_finetune.py)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    ap.add_argument("--open-clip", default=None,
                    help="open_clip model name: fine-tune its visual tower + a linear head")
    ap.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model (e.g. a tiny config)")
    ap.add_argument("--checkpoint", default=None, help="local pretrained weights (state dict file)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--data-dir", default=None, help="ImageFolder root; synthetic images if omitted")
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--ema-decay", type=float, default=0.3)
    ap.add_argument("--resample-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-at", type=int, default=None)
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--out", default=None, help="write the training weights (before finalize) and a JSON summary here")
    ap.add_argument("--reference", type=int, default=None, metavar="N",
                    help="no Accelerate: one process emulating N data-parallel ranks")
    ap.add_argument("--reference-layout", choices=("default", "zero12"), default="default",
                    help="supports of the reference run: per parameter (DDP, FSDP, ZeRO-3) or per flattened "
                         "param group (DeepSpeed ZeRO-1/2)")
    args = ap.parse_args(argv)
    if args.save_at is not None and (args.state_dir is None or not 0 < args.save_at < args.steps):
        ap.error("--save-at K needs --state-dir and 0 < K < --steps")
    return args


def build_optimizer(model: nn.Module, args) -> GMixoutOptimizer:
    groups = gmixout_param_groups(model, weight_decay=args.weight_decay)
    return GMixoutOptimizer(groups, inner="AdamW", p=args.p, ema_decay=args.ema_decay,
                            resample_every=args.resample_every, seed=args.seed, lr=args.lr, eps=args.eps)


class Batches:
    """Global batch of step ``s`` (size ``world * batch_size``), the same for any world size."""

    def __init__(self, args, world: int):
        self.args, self.world = args, world
        self.folder = None
        if args.data_dir:
            from torchvision import datasets, transforms
            tf = transforms.Compose([transforms.RandomResizedCrop(args.image_size), transforms.ToTensor(),
                                     transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
            self.folder = datasets.ImageFolder(args.data_dir, transform=tf)

    def __call__(self, step: int, rank: int):
        a, b = self.args, self.args.batch_size
        g = torch.Generator().manual_seed(a.seed * 100003 + step)
        if self.folder is None:
            x = torch.randn(self.world * b, 3, a.image_size, a.image_size, generator=g)
            y = torch.randint(0, a.num_classes, (self.world * b,), generator=g)
        else:
            idx = torch.randint(0, len(self.folder), (self.world * b,), generator=g).tolist()
            items = [self.folder[i] for i in idx[rank * b:(rank + 1) * b]]
            return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
        return x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]


def reference(args) -> dict:
    """One process, ``args.reference`` ranks emulated (DDP divides each rank's gradient by the
    world size and sums: g_0/N + g_1/N + ...)."""
    n = args.reference
    model = build_model(args, args.seed)
    opt = build_optimizer(model, args)
    if args.reference_layout == "zero12":
        from gmixout_optim.integrations.deepspeed import zero12_layout_locator
        opt.set_locator(zero12_layout_locator(opt))
    batches = Batches(args, n)
    for step in range(1, args.steps + 1):
        for r in range(n):
            x, y = batches(step, r)
            (F.cross_entropy(model(x), y) / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt.finalize()
    return {"weights": weights, "summary": {"steps": args.steps, "world": n}}


def train(args, accelerator=None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from gmixout_optim.integrations.accelerate import prepare, unwrap_optimizer

    accelerator = accelerator or Accelerator()
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # no DataLoader goes through prepare: tell DeepSpeed the micro batch
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
        ds_config["train_batch_size"] = (args.batch_size * accelerator.num_processes
                                         * accelerator.gradient_accumulation_steps)
    model = build_model(args, args.seed)
    opt = build_optimizer(model, args)
    model, opt = prepare(accelerator, model, opt)
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = Batches(args, world)

    def run(steps):
        model.train()
        for step in steps:
            x, y = batches(step, rank)
            loss = F.cross_entropy(model(x.to(accelerator.device)), y.to(accelerator.device))
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if accelerator.is_main_process and step % max(1, args.steps // 10) == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)

    summary = {"steps": args.steps, "world": world, "distributed_type": str(accelerator.distributed_type)}
    if args.save_at is None:
        run(range(1, args.steps + 1))
    else:
        run(range(1, args.save_at + 1))
        accelerator.save_state(args.state_dir)
        accelerator.wait_for_everyone()
        run(range(args.save_at + 1, args.steps + 1))
        first = {k: v.detach().clone() for k, v in (accelerator.get_state_dict(model) or {}).items()}
        accelerator.wait_for_everyone()
        accelerator.load_state(args.state_dir)
        run(range(args.save_at + 1, args.steps + 1))
        again = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            summary["roundtrip_max_diff"] = max(float((first[k].float() - again[k].float()).abs().max())
                                                for k in first if first[k].numel())
    # Full weights on the main process (a collective); cloned: for DDP they share the parameters'
    # storage, which finalize() edits.
    # (ZeRO-3 returns them on the main process only.)
    weights = {k: v.detach().clone() for k, v in (accelerator.get_state_dict(model) or {}).items()}
    core = unwrap_optimizer(opt)
    summary["episodes"] = sorted({st["episode"] for st in core.state.values() if "episode" in st})
    summary["sharded_params"] = sum(hasattr(p, "placements") for p in model.parameters())
    if deepspeed:  # the fp32 master partitions hold the weights: finalize there, copy back
        from gmixout_optim.integrations import deepspeed as ds
        ds.finalize(model)
    else:
        core.finalize()
    # Every rank leaves the process group together: a rank exiting with gloo (or DeepSpeed's
    # shared-memory comm) still live under another aborted at interpreter exit.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"weights": weights, "summary": summary, "main": accelerator.is_main_process}


def main(argv=None, accelerator=None):
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = reference(args) if args.reference else train(args, accelerator)
    if args.out and result.get("main", True):
        torch.save({k: v.detach().cpu() for k, v in result["weights"].items()}, args.out)
        with open(args.out + ".json", "w") as f:
            json.dump(result["summary"], f, indent=1)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
