"""The weight cache of the embedded tasks: trained state dicts keyed by their recipe.

Each entry is ``<name>-<key>.pt`` with a SHA-256 checksum beside it; ``key`` hashes the seed and
the whole training recipe, so weights are never loaded into a changed model. A missing, corrupt
or truncated entry is rebuilt rather than reported, and entries are written atomically so that
concurrent workers building the same one never read a half-written file.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import hashlib
import json
import os
from pathlib import Path
import pickle
import tempfile
from typing import Any

import platformdirs
import torch

from optuna_ctpe.tasks._task import CACHE_ENV


def default_cache_dir() -> Path:
    """``$OPTUNA_CTPE_CACHE_DIR`` if set, else the platform's user cache folder for
    ``optuna-ctpe`` (``platformdirs.user_cache_dir``: ``$XDG_CACHE_HOME/optuna-ctpe`` or
    ``~/.cache/optuna-ctpe`` on Linux, ``~/Library/Caches/optuna-ctpe`` on macOS, under
    ``%LOCALAPPDATA%`` on Windows)."""
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit)
    return Path(platformdirs.user_cache_dir("optuna-ctpe"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: Path, checksum_path: Path) -> dict[str, torch.Tensor] | None:
    """The cached state dict, or None if it is missing, unreadable or fails its checksum."""
    try:
        if checksum_path.read_text().strip() != _sha256(path):
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        return None
    return state if isinstance(state, dict) else None


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_state(
    name: str,
    recipe: Mapping[str, Any],
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
    train: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The state dict trained by ``train()`` for ``(name, recipe, seed)``, from the cache if there.

    Args:
        name: File-name prefix of the entry, e.g. ``"digits"``.
        recipe: Everything that decides the weights besides the seed (JSON-serialisable).
        seed: The training seed.
        cache_dir: The cache folder; ``None`` uses :func:`default_cache_dir`.
        train: Builds the state dict when the entry is missing or invalid.
    """
    key = hashlib.sha256(json.dumps({"seed": seed, **recipe}, sort_keys=True).encode())
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = folder / f"{name}-{key.hexdigest()[:16]}.pt"
    checksum_path = path.with_name(path.name + ".sha256")
    state = _load(path, checksum_path)
    if state is not None:
        return state
    state = train()
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: torch.save(state, p))
    _atomic_write(checksum_path, lambda p: p.write_text(_sha256(path) + "\n"))
    return state


def single_threaded(train: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``train()`` on one intra-op thread, restoring the caller's thread count.

    A fixed thread count keeps the floating-point reduction order, hence the trained weights,
    reproducible for a seed on a CPU.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train()
    finally:
        torch.set_num_threads(threads)
