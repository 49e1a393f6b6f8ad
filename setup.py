from setuptools import find_packages, setup

setup(
    name="llm_finetune",
    version="0.1.0",
    description="torchrun-native fine-tuning of Hugging Face causal LMs with raw PyTorch FSDP",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llm_finetune", "llm_finetune.*"]),
    package_data={"llm_finetune": ["assets/*/*"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0",
        "peft>=0.17",
        "bitsandbytes>=0.45",
        "datasets>=4.0",
        "fire>=0.6",
        "tqdm",
        "pyyaml",
        "safetensors",
    ],
    extras_require={
        "tracking": ["tensorboard", "wandb"],
        "plot": ["matplotlib"],
        # python -m llm_finetune.evaluate; not in "test": 41 packages, 350 MB, about a minute
        # to install (docs/evaluation.md), so CI skips tests/test_evaluate.py without it
        "eval": ["lm_eval>=0.4.13,<0.5"],
        # --float8: float8 matmuls for full fine-tuning on H100-class GPUs (docs/performance.md)
        "float8": ["torchao>=0.16"],
        # the optional paths are tested too: TensorBoard, plots, the executed notebook
        "test": ["pytest>=8", "pytest-xdist>=3", "tensorboard", "matplotlib", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": ["llm-finetune=llm_finetune.finetuning:console_main"]},
)
