"""Building a checkpoint on this host, shared by the tiny builders (one per family).

A builder writes a whole pipeline with ``save_pretrained`` into a directory; this
module makes that atomic (a sibling staging directory renamed into place, so an
interrupted build never leaves half a checkpoint), idempotent (a complete
checkpoint is left alone) and runnable as ``python -m <builder> [PATH]``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CHECKPOINT_DIR_MODE = 0o755

# Writes a complete pipeline into an empty directory, its weights seeded by the int.
SaveFunction = Callable[[Path, int], None]


def is_complete(path: Path, required_files: Sequence[str]) -> bool:
    return all((path / name).is_file() for name in required_files)


def build_atomically(
    path: Path, save: SaveFunction, required_files: Sequence[str], seed: int = 0
) -> Path:
    """Build the checkpoint at ``path`` with ``save`` unless a complete one is there.

    The build goes to a sibling temporary directory renamed into place at the
    end, so an interrupted build never leaves a half checkpoint at ``path``.
    """
    if is_complete(path, required_files):
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists but is not a complete checkpoint; remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    # mkdtemp makes it private (0700); the checkpoint is meant to be shared read-only.
    staging.chmod(CHECKPOINT_DIR_MODE)
    try:
        save(staging, seed)
        if path.exists():
            path.rmdir()  # empty, checked above
        staging.rename(path)
    except OSError:
        # Another process may have finished the same build first: accept its result.
        if not is_complete(path, required_files):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def builder_main(
    argv: list[str] | None,
    profile_name: str,
    build: Callable[[Path], Path],
    required_files: Sequence[str],
) -> int:
    """``python -m <builder> [PATH]``: build ``profile_name``'s checkpoint at PATH
    (default ``<models_dir>/<profile>``), or say it is already there."""
    from core.ml.profiles import get_profile

    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(f"usage: python -m {get_profile(profile_name).builder} [PATH]", file=sys.stderr)
        return 2
    if args:
        path = Path(args[0])
    else:
        from core.settings import Settings

        path = Settings().models_dir / profile_name
    if is_complete(path, required_files):
        print(f"{profile_name} checkpoint already complete at {path}; nothing to do")
        return 0
    started = time.monotonic()
    build(path)
    print(f"built {profile_name} checkpoint at {path} in {time.monotonic() - started:.1f} s")
    return 0
