"""Documents of the quickstart_held_out task: the jsonl named by QUICKSTART_VALID (default the
quickstart's held-out works), read locally."""

import os

DEFAULT = "runs/quickstart/corpus/valid.jsonl"


def documents(**kwargs):
    import datasets

    path = os.environ.get("QUICKSTART_VALID", DEFAULT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"QUICKSTART_VALID={path} is not a file; run scripts/quickstart_cpu.sh first "
                                "or point QUICKSTART_VALID at a jsonl with a 'text' field")
    return datasets.load_dataset("json", data_files={"test": path})
