from setuptools import find_packages, setup

setup(
    name="megatron-psft",
    version="0.1.0",
    description="Proximal Supervised Fine-Tuning (PSFT) for Mixture-of-Experts models on Megatron-Core",
    packages=find_packages(include=["megatron_psft*", "checkpoint_convert*"]),
    package_data={"megatron_psft": ["assets/**/*"]},
    python_requires=">=3.10",
    # Loose on purpose: cluster containers bring their own (newer) torch and megatron-core.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "transformers>=4.51",
        "safetensors",
        "sentencepiece",
        "numpy",
        "psutil",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0", "nvidia-modelopt"],
        "apex": ["apex"],
        "metrics": ["tensorboard", "matplotlib"],
        "test": ["pytest"],
    },
)
