"""A checkpoint's identity: a digest of what it holds, not of where it lies.

Whatever the base model made and a cache keeps (class images, today) must be keyed
by the weights that made it: pointing a profile at another checkpoint (a newer
revision, a fine-tuned variant with the same architecture) must miss the cache,
while two workers on two hosts holding the same files must hit the same entries in
the shared blob store. So the digest covers the checkpoint's contents, never its
path or modification times.

Hashing every byte would cost a full read of 4-7 GB per worker start; instead
each weight file contributes its name, its size and a few evenly spaced windows of
its bytes (the safetensors header with every tensor's name and offsets, and
samples of the tensors themselves). Two checkpoints with the same architecture but
other weights differ in every tensor, so they differ in every window. Config files
(JSON, tokenizer files) are small and hashed whole.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx")
SAMPLE_BYTES = 1 << 20  # one window
SAMPLE_WINDOWS = 4  # evenly spaced, the first at offset 0 and the last at the end
DIGEST_CHARS = 16  # 64 bits: collisions are not a concern among a host's checkpoints


def _is_weights(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES


def _hash_sampled(path: Path, size: int, update: Callable[[bytes], object]) -> None:
    with path.open("rb") as file:
        if size <= SAMPLE_BYTES * SAMPLE_WINDOWS:
            update(file.read())
            return
        last = size - SAMPLE_BYTES
        for window in range(SAMPLE_WINDOWS):
            file.seek(last * window // (SAMPLE_WINDOWS - 1))
            update(file.read(SAMPLE_BYTES))


def _files(root: Path) -> list[Path]:
    # Hidden entries (a download's .cache/, a builder's staging dirs) are not the model.
    files = []
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files += [Path(directory) / name for name in sorted(names) if not name.startswith(".")]
    return files


def checkpoint_identity(root: Path) -> str:
    """The digest of the checkpoint directory ``root`` (``DIGEST_CHARS`` hex)."""
    digest = hashlib.sha256()
    for path in _files(root):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        if _is_weights(path):
            _hash_sampled(path, size, digest.update)
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:DIGEST_CHARS]


@lru_cache(maxsize=16)
def _cached(root: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    return checkpoint_identity(Path(root))


def cached_checkpoint_identity(root: Path) -> str:
    """``checkpoint_identity``, computed once per process for files that have not
    changed since (same names, sizes and modification times)."""
    resolved = root.resolve()
    signature = tuple(
        (str(path), stat.st_size, stat.st_mtime_ns)
        for path in _files(resolved)
        for stat in (path.stat(),)
    )
    return _cached(str(resolved), signature)
