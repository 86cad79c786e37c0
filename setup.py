from setuptools import find_packages, setup

setup(
    name="neox-train",
    version="0.1.0",
    description="GPT-NeoX training on the DeepSpeed engine, with checkpoints and exact resume",
    packages=find_packages(include=["neox_train", "neox_train.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Pinned: on a CPU machine pip takes the local CPU wheel; on a GPU machine the same pin is the CUDA build.
        # An unpinned torch would pull a multi-GB CUDA build onto CPU machines.
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        "tokenizers>=0.22,<0.24",
        "numpy>=1.26",
        "tensorboard>=2.16",
        "google-cloud-storage>=3.0,<4",
        "tqdm>=4.66",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={
        "console_scripts": [
            "neox-train=neox_train.cli:train_main",
            "neox-data=neox_train.cli:data_main",
        ]
    },
)
