from setuptools import find_packages, setup

setup(
    name="neox-train",
    version="0.1.0",
    description="GPT-NeoX training on the DeepSpeed engine, with checkpoints and exact resume",
    packages=find_packages(include=["neox_train", "neox_train.*"]) + ["neox_train.ds_configs"],
    # The DeepSpeed JSONs live at the top level (the product layout) and ship inside the package
    # in a wheel.
    package_dir={"neox_train.ds_configs": "ds_configs"},
    package_data={"neox_train.ds_configs": ["*.json"]},
    python_requires=">=3.10",
    install_requires=[
        # Pinned: on a CPU machine pip takes the local CPU wheel; on a GPU machine the same pin is
        # the CUDA build. An unpinned torch would pull a multi-GB CUDA build onto CPU machines.
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        # transformers' ZeRO-3 model construction (HfDeepSpeedConfig) requires it.
        "accelerate>=1.1.0",
        "google-crc32c>=1.5",
        "tokenizers>=0.22,<0.24",
        "numpy>=1.26",
        "tensorboard>=2.16",
        "google-cloud-storage>=3.13,<4",  # crc32c_checksum_value appeared in 3.13
        "tqdm>=4.66",
        # Imported directly (pre-flight's host memory; the gs:// backend's network errors), not only
        # through deepspeed and google-cloud-storage.
        "psutil>=5.9",
        "requests>=2.31",
        # neox-data prepare's inputs: Parquet and HF `save_to_disk` folders (Arrow), .jsonl.zst.
        "pyarrow>=15",
        "zstandard>=0.22",
    ],
    # ruff pinned: its findings are part of CI's verdict, so a new release cannot fail a run by
    # itself. pytest-xdist runs the suite on every core (most tests wait on subprocesses; one core
    # sits idle without it). megatron-core reads back the indexed datasets prepare writes; datasets
    # makes the save_to_disk folders the tests read and is what bench/prepare_bench.py compares
    # against.
    # The trackers and lm-evaluation-harness are optional (report_to, neox-eval name the extra
    # when it is missing); the test extra pins them, so CI tests the versions named here.
    extras_require={
        "wandb": ["wandb>=0.19.10"],  # reinit="create_new"
        "mlflow": ["mlflow>=3.0"],  # the full package: `mlflow server` and its SQLite store
        "eval": ["lm-eval>=0.4.13,<0.5"],
        "test": ["pytest>=8", "pytest-xdist==3.8.0", "gcp-storage-emulator>=2024.8",
                 "pyyaml>=6", "ruff==0.17.6", "megatron-core==0.16.1", "datasets==5.2.0",
                 "wandb==0.30.0", "mlflow==3.17.2", "lm-eval==0.4.13"],
    },
    entry_points={
        "console_scripts": [
            "neox-train=neox_train.cli.train:entry",
            "neox-data=neox_train.cli.data:main",
            "neox-sync=neox_train.cli.sync:main",
            "neox-launch=neox_train.cli.launch:main",
            "neox-convert-hf=neox_train.cli.convert:main",
            "neox-eval=neox_train.cli.eval:main",
        ]
    },
)
