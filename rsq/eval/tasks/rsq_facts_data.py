"""Loader of the local ``rsq_facts`` lm-eval task: the jsonl next to this file as a DatasetDict.

lm-eval calls it as ``custom_dataset(**metadata, **dataset_kwargs)``; the keyword arguments are
not needed and are ignored. Imported by lm-eval from this file's path, not as part of ``rsq``.
"""

import json
from pathlib import Path

DATA = Path(__file__).with_name("rsq_facts.jsonl")


def load(**_ignored):
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
