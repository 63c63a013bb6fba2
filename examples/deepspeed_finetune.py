"""Fine-tune a timm or open_clip vision model with GMixout chosen in a DeepSpeed JSON config.

Launch (GPU: one process per GPU; CPU: add ``DS_ACCELERATOR=cpu``)::

    deepspeed --num_gpus 2 examples/deepspeed_finetune.py \
        --deepspeed-config configs/deepspeed/zero2_bf16.json --model vit_base_patch16_224 \
        --checkpoint vit_b16.pth --data-dir DATA --steps 2000 --save-dir runs/ds

    # the same on CPU, 2 processes (torchrun works as well as the deepspeed launcher)
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 examples/deepspeed_finetune.py \
        --deepspeed-config configs/deepspeed/zero3_bf16.json --model vit_tiny_patch16_224 \
        --model-kwargs '{"img_size": 32, "patch_size": 8, "depth": 2}' --image-size 32 --steps 4

The only GMixout-specific lines are ``register()`` (the config's ``"type": "GMixout"``
resolves to it), ``gmixout_param_groups`` (sparse episodes on Linear/Conv weights, dense
AdamW on the rest) and ``finalize`` at the end, after which the checkpoint's fp32 weights
(``zero_to_fp32.py``) are the plain fine-tuned model. Data: an ImageFolder (``--data-dir``)
or seeded synthetic images. Weights: ``--checkpoint`` (a local state dict); nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from gmixout_optim import gmixout_param_groups
from gmixout_optim.integrations import deepspeed as gds

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # under runpy.run_path as well as as a script
from _vision_model import build_model  # noqa: E402  (shared with accelerate_finetune.py)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deepspeed-config", required=True, help="a configs/deepspeed/*.json")
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    ap.add_argument("--open-clip", default=None, help="open_clip model name: its visual tower + a linear head")
    ap.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model")
    ap.add_argument("--checkpoint", default=None, help="local pretrained weights (state dict file)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--data-dir", default=None, help="ImageFolder root; synthetic images if omitted")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--weight-decay", type=float, default=0.05, help="of the 2-D weights (1-D tensors get none)")
    ap.add_argument("--optimizer-params", default="{}",
                    help='JSON overrides of the config\'s optimizer params, e.g. \'{"lr": 1e-4, "p": 0.8}\'')
    ap.add_argument("--save-dir", default=None, help="DeepSpeed checkpoints (tag 'final' after finalize)")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return ap.parse_args(argv)


def batches(args, micro_batch: int, rank: int, world: int):
    """Endless (images, labels) micro-batches for this rank."""
    if args.data_dir:
        from torchvision import datasets, transforms
        tf = transforms.Compose([transforms.Resize((args.image_size, args.image_size)), transforms.ToTensor(),
                                 transforms.Normalize([0.5] * 3, [0.5] * 3)])
        ds = datasets.ImageFolder(args.data_dir, tf)
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=micro_batch, sampler=sampler, drop_last=True)
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    g = torch.Generator().manual_seed(1000 + rank)
    while True:
        yield (torch.randn(micro_batch, 3, args.image_size, args.image_size, generator=g),
               torch.randint(0, args.num_classes, (micro_batch,), generator=g))


def main(argv=None) -> None:
    args = parse_args(argv)
    gds.register()  # torch.optim.GMixout: the config's "type": "GMixout" resolves to it
    import deepspeed

    with open(args.deepspeed_config) as f:
        config = json.load(f)
    config["optimizer"]["params"].update(json.loads(args.optimizer_params))
    gds.check_config(config)  # explains missing ZeRO flags or bad GMixout params up front
    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    model = build_model(args, seed=0)
    groups = gmixout_param_groups(model, weight_decay=args.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    dtype = torch.bfloat16 if (config.get("bf16") or {}).get("enabled") else torch.float32
    data = batches(args, engine.train_micro_batch_size_per_gpu(), rank, world)

    for step in range(args.steps):
        for _ in range(engine.gradient_accumulation_steps()):
            images, labels = next(data)
            loss = F.cross_entropy(engine(images.to(engine.device, dtype)).float(), labels.to(engine.device))
            engine.backward(loss)
            engine.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}")

    gds.finalize(engine)  # the model now holds the anchor: a plain dense model
    if args.save_dir:
        engine.save_checkpoint(args.save_dir, tag="final")
        if rank == 0:
            # zero_to_fp32's second argument is an output FOLDER (DeepSpeed 0.19.8, pinned, writes
            # pytorch_model.bin, or model.safetensors with --safe_serialization, inside it).
            print(f"fp32 weights: python -m deepspeed.utils.zero_to_fp32 {args.save_dir} "
                  f"{os.path.join(args.save_dir, 'fp32')} --tag final   "
                  f"(writes {os.path.join(args.save_dir, 'fp32', 'pytorch_model.bin')})")
    engine.destroy()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean exit: no rank tears down gloo under another


if __name__ == "__main__":
    main()
