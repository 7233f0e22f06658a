"""RUN/results.json, written by every evaluation command through one merge: a command adds or replaces its own
entries and keeps everyone else's (k-NN after fine-tuning keeps the fine-tuning scores).

The read-modify-write holds an exclusive fcntl lock on RUN/results.json.lock, so two evaluations finishing at
once do not drop each other's entries, and the new file replaces the old one atomically (a temporary file, then
a rename), so a crash mid-write leaves the previous results readable.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

RESULTS_FILE = "results.json"


def merge_results(run_dir: Path, updates: dict) -> dict:
    """Merge `updates` into RUN/results.json (dict entries key by key, the rest replaced); the merged results."""
    path = Path(run_dir) / RESULTS_FILE
    with open(path.with_name(RESULTS_FILE + ".lock"), "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        for key, value in updates.items():
            if isinstance(value, dict) and isinstance(results.get(key), dict):
                results[key].update(value)
            else:
                results[key] = value
        staging = path.with_name(f".{RESULTS_FILE}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(staging, path)
    return results
