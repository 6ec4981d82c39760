"""Every default and magic number of the worker, each with its reason."""

from __future__ import annotations

import os
from pathlib import Path

# The label file the TF Hub tutorial downloads (pinned commit, so the order never changes).
LABELS_URL = (
    "https://raw.githubusercontent.com/tensorflow/models/f8af2291cced43fc9f1d9b41ddbf772ae7b0d7d2/"
    "official/projects/movinet/files/kinetics_600_labels.txt"
)
LABELS_CACHE_NAME = "kinetics_600_labels.txt"
# A label download that takes longer than this is a network that is not there.
FETCH_TIMEOUT_SECONDS = 10.0


def cache_dir() -> Path:
    """Where fetched labels (and test models) are kept: $MOVINET_CACHE_DIR, else XDG's cache."""
    env = os.environ.get("MOVINET_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "movinet-worker"


# The TF backend pads batches to these sizes: each new size costs ~2.7 s of graph set-up on first
# use (measured), and powers of two waste at most half a batch.
TF_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# Top-k printed or published by default, as in the tutorial.
DEFAULT_TOP_K = 5
# The Redis every command uses when neither --redis-url nor REDIS_URL says otherwise.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
