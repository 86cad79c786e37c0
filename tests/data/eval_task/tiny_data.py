"""Dataset loaders for the tiny offline lm-eval tasks in this folder.

lm-eval hands `dataset_kwargs.data_files` to datasets.load_dataset unchanged, so a relative path
there resolves against the process's working directory, not the YAML's folder. These loaders
(referenced from the YAMLs as `custom_dataset: !function tiny_data.<name>`, which lm-eval does
resolve beside the YAML) read the .jsonl next to this file instead, and build the splits in memory
(datasets.Dataset.from_list): no datasets cache is written.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    with open(HERE / name, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_cloze(**kwargs) -> datasets.DatasetDict:
    """lm-eval passes the task's metadata (version, config_source, model args...) as kwargs."""
    return _load("tiny_cloze.jsonl")


def load_lambada(**kwargs) -> datasets.DatasetDict:
    return _load("tiny_lambada.jsonl")
