from setuptools import find_packages, setup

setup(
    name="mokd",
    version="0.1.0",
    description="Multi-mode Online Knowledge Distillation: two vision models learn self-supervised together",
    packages=find_packages(include=["mokd", "mokd.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.14,<2.15",
        "torchvision>=0.29,<0.30",
        "timm>=1.0",
        "omegaconf>=2.3",
        "tensorboard>=2.15",
        "tqdm>=4.60",
        "numpy",
        "pillow",
        "pyyaml",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "threadpoolctl>=3.1",
        "webdataset>=1.0",
    ],
    extras_require={
        # The tests run real DeepSpeed (ZeRO-1/2/3 on CPU with gloo); users of parallel.strategy=deepspeed
        # install it with `pip install mokd[deepspeed]`.
        "dev": ["pytest>=7", "deepspeed>=0.17"],
        "deepspeed": ["deepspeed>=0.17"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["mokd=mokd.launch.cli:main"]},
)
