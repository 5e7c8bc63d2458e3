from setuptools import find_packages, setup

setup(
    name="megatron-psft",
    version="0.1.0",
    description="Proximal Supervised Fine-Tuning (PSFT) for Mixture-of-Experts models on Megatron-Core",
    packages=find_packages(include=["megatron_psft*", "checkpoint_convert*"]),
    package_data={"megatron_psft": ["assets/**/*"]},
    # The tools/ scripts, for an install without the checkout (tools/ is not a package).
    entry_points={
        "console_scripts": [
            "megatron-psft-preprocess = megatron_psft.data.preprocess:main",
            "megatron-psft-clipped-tokens = megatron_psft.reports.clipped_tokens:main",
        ],
    },
    python_requires=">=3.10",
    # Cluster containers bring their own torch. megatron-core: the CPU suite runs 0.16.1 (Python 3.11)
    # and 0.19.2 (Python 3.12); cpu_compat refuses other versions on CPU.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.51",
        "safetensors",
        "sentencepiece",
        "numpy",
        "psutil",
    ],
    extras_require={
        # 2.6: FP8 with selective moe_act / layernorm recompute (megatron-core's own check; the run
        # script's default); moe_permute_fusion needs 2.1. Matches platform.MIN_TRANSFORMER_ENGINE.
        # No nvidia-modelopt: the served checkpoint is the block-FP8 export (docs/conversion.md, "ModelOpt").
        "gpu": ["transformer-engine[pytorch]>=2.6,<3"],
        "apex": ["apex"],
        "metrics": ["tensorboard", "matplotlib"],
        "plot": ["matplotlib"],  # python -m megatron_psft.reports.plot
        # megatron-psft-preprocess's parquet and `datasets` (save_to_disk) inputs; JSONL needs neither, nor does
        # training, so a cluster container is not made to carry them. requirements-cpu*.txt pin the tested versions.
        "data": ["datasets>=3.0", "pyarrow>=15"],
        "test": ["pytest"],
    },
)
