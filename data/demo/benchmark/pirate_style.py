"""The data of the demo benchmark task (pirate_style.yaml), read from beside this file: lm-evaluation-harness calls
`load` (the task's `custom_dataset`) wherever the project is cloned and whatever the working directory."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "pirate_style.jsonl"


def load(**metadata):
    """{"test": the rows} as a datasets.DatasetDict; `metadata` (the task's, passed by the harness) is not used."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA)})
