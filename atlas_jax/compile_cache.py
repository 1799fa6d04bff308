"""The persistent XLA compilation cache: compiled programs are reused across restarts and runs.

``enable(setting, output_dir)`` turns it on for this process (``config.mesh.compilation_cache``): "run" keeps
the cache in ``<output_dir>/jax_cache`` (a resumed run reuses its programs), "user" in
``$XDG_CACHE_HOME/atlas-jax/jax_cache`` (``~/.cache/...``; shared by every run of this user), any other
non-empty string is a directory, "" turns it off. Entries are keyed by the program, the compiler flags and the
devices, so a stale entry is never used; only programs that took at least ``min_compile_s`` to compile are stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_dir(setting: str, output_dir: str | os.PathLike[str]) -> Path | None:
    """The directory ``setting`` names (None when the cache is off)."""
    setting = str(setting).strip()
    if not setting:
        return None
    if setting == "run":
        return Path(output_dir) / "jax_cache"
    if setting == "user":
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "atlas-jax" / "jax_cache"
    return Path(setting).expanduser()


def enable(setting: str, output_dir: str | os.PathLike[str], min_compile_s: float = 1.0) -> Path | None:
    """Points JAX's persistent compilation cache at ``cache_dir(setting, output_dir)``; returns it (or None).

    Raises:
      ValueError: the directory cannot be created (names ``--config.mesh.compilation_cache``).
    """
    path = cache_dir(setting, output_dir)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--config.mesh.compilation_cache={setting!r}: cannot create {path}: {e}") from e
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    return path
