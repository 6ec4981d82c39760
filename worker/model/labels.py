"""The class names: from a file the user names, or fetched once from the tutorial's URL and cached."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from worker.constants import FETCH_TIMEOUT_SECONDS, LABELS_CACHE_NAME, LABELS_URL, cache_dir
from worker.model.backends.base import ModelLoadError


def _parse(text: str, source: str) -> list[str]:
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ModelLoadError(f"label file {source} is empty")
    return labels


def load_labels(path: str | os.PathLike[str] | None = None, url: str = LABELS_URL) -> list[str]:
    """Labels from `path`, else from the cache, else downloaded into the cache."""
    if path is not None:
        try:
            return _parse(Path(path).read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise ModelLoadError(f"cannot read labels {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise ModelLoadError(
                f"labels {path} is not a UTF-8 text file: pass --labels a text file, one label per line"
            ) from None
    cached = cache_dir() / LABELS_CACHE_NAME
    if cached.is_file():
        return _parse(cached.read_text(encoding="utf-8"), str(cached))
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"no label file given and none cached at {cached}, and fetching {url} failed ({exc}). "
            "Pass --labels PATH (one Kinetics-600 label per line, in the model's output order) "
            f"or put that file at {cached}."
        ) from exc
    labels = _parse(text, url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cached.parent, delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, cached)  # atomic: concurrent workers never read half a file
    return labels


def check_labels(labels: list[str], num_classes: int, source: str) -> None:
    if len(labels) != num_classes:
        raise ModelLoadError(
            f"the model has {num_classes} classes but the label file has {len(labels)} lines; "
            f"pass the label file that matches {source}"
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable labels of one probability row, highest first."""
    k = min(k, probs.shape[-1])
    idx = np.argpartition(-probs, k - 1)[:k]
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [(labels[i], float(probs[i])) for i in idx]
