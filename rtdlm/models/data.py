"""Byte-level tokenizer and the training corpus (Python's own standard library).

Tokens are bytes: `encode` maps a str to its UTF-8 bytes as int32 ids 0..255,
`decode` maps ids back (invalid UTF-8 becomes U+FFFD). Byte 0 (NUL, which does
not occur in Python source) is the document separator and BOS/EOS token.

The corpus is the `.py` source of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`), so every machine has it and nothing is
downloaded. Test suites (`test`, `tests`, `idle_test` directories) and
`site-packages` are left out. Files are split into train and validation by a
hash of their path relative to the stdlib root, so the split does not depend
on the machine or on which other files exist.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib
from collections.abc import Iterator

import numpy as np

VOCAB_SIZE = 256
EOS_ID = 0  # NUL byte: separates files; also usable as BOS/EOS.
BOS_ID = EOS_ID

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as an int32 array [len(bytes)]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def byte_vocabulary() -> list[bytes]:
    """Each token id's bytes (id i is byte i), for `rtdlm.constraints`; EOS is `EOS_ID`."""
    return [bytes([i]) for i in range(VOCAB_SIZE)]


def decode(ids) -> str:
    """Inverse of `encode` for ids in 0..255 (others are skipped); bad UTF-8 -> U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < VOCAB_SIZE)]
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def stdlib_dir() -> str:
    """Root of the running Python's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_source_files(root: str | None = None) -> list[str]:
    """Sorted relative paths of the stdlib `.py` files used as corpus."""
    root = root or stdlib_dir()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(paths)


def is_validation_file(relative_path: str, validation_fraction: float = 0.05) -> bool:
    """Deterministic split: a file is in validation if its path hash falls below the fraction."""
    key = relative_path.replace(os.sep, "/").encode("utf-8")
    return (zlib.crc32(key) % 10_000) < int(round(validation_fraction * 10_000))


@dataclasses.dataclass
class Corpus:
    """Train and validation token streams (files joined by EOS_ID) and their provenance."""

    train: np.ndarray  # [N_train] uint8
    validation: np.ndarray  # [N_val] uint8
    num_train_files: int
    num_validation_files: int
    root: str
    python_version: str

    def summary(self) -> dict:
        return {
            "source": "Python standard library .py files (tests and site-packages excluded)",
            "root": self.root,
            "python_version": self.python_version,
            "train_files": self.num_train_files,
            "validation_files": self.num_validation_files,
            "train_bytes": int(self.train.size),
            "validation_bytes": int(self.validation.size),
        }


def load_stdlib_corpus(
    root: str | None = None, validation_fraction: float = 0.05, max_files: int | None = None
) -> Corpus:
    """Reads the stdlib corpus and splits it by file.

    Args:
      root: directory to read (default: this interpreter's stdlib).
      validation_fraction: share of files (by path hash) held out for validation.
      max_files: if set, only the first `max_files` paths (sorted) are read;
        for quick tests.
    """
    import platform

    root = root or stdlib_dir()
    files = stdlib_source_files(root)
    if max_files is not None:
        files = files[:max_files]
    train_parts, val_parts = [], []
    separator = bytes([EOS_ID])
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            content = f.read().replace(separator, b"")
        (val_parts if is_validation_file(rel, validation_fraction) else train_parts).append(
            content + separator
        )
    if not train_parts or not val_parts:
        raise ValueError(
            f"corpus split is empty (train {len(train_parts)} files, validation "
            f"{len(val_parts)} files) under {root!r}"
        )
    return Corpus(
        train=np.frombuffer(b"".join(train_parts), dtype=np.uint8),
        validation=np.frombuffer(b"".join(val_parts), dtype=np.uint8),
        num_train_files=len(train_parts),
        num_validation_files=len(val_parts),
        root=root,
        python_version=platform.python_version(),
    )


def random_windows(
    stream: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of random windows: (inputs [B, L] int32, targets [B, L] int32), targets = next byte."""
    if stream.size < seq_len + 1:
        raise ValueError(f"stream of {stream.size} bytes is shorter than seq_len + 1")
    starts = rng.integers(0, stream.size - seq_len, size=batch_size)  # [B]
    windows = stream[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)  # [B, L+1]
    return windows[:, :-1], windows[:, 1:]


def batch_iterator(
    stream: np.ndarray, batch_size: int, seq_len: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless iterator of `random_windows` batches from a seeded numpy RNG."""
    rng = np.random.default_rng(seed)
    while True:
        yield random_windows(stream, batch_size, seq_len, rng)


def fixed_batches(
    stream: np.ndarray, num_batches: int, batch_size: int, seq_len: int, seed: int = 1234
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same `num_batches` random-window batches on every call (for validation)."""
    rng = np.random.default_rng(seed)
    return [random_windows(stream, batch_size, seq_len, rng) for _ in range(num_batches)]
