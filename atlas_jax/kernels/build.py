"""Compiling a kernel's C++ source into a shared library once per machine, safely under concurrent processes.

The library is named by a hash of the source, the compiler flags, the compiler and the jax version (jaxlib's
FFI headers), lives in ``$XDG_CACHE_HOME/atlas_jax/`` (default ``~/.cache``), and is written to a temporary
file in that folder and renamed, so no process ever loads half a file and a failed build leaves nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax


def compiler() -> str:
    """``$CXX``, default ``g++``."""
    return os.environ.get("CXX") or "g++"


def library_path(source: Path, flags: Sequence[str], cache_dir: Path | None = None) -> Path:
    """Where ``source`` built with ``flags`` lives: ``<cache>/<stem>-<hash>.so``."""
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atlas_jax"
    digest = hashlib.sha256(source.read_bytes())
    digest.update(" ".join((*flags, jax.__version__, compiler())).encode())
    return base / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def build(source: Path, flags: Sequence[str], out: Path, env: str) -> Path:
    """Compiles ``source`` to ``out`` (kept if it exists) against jaxlib's FFI headers.

    Args:
      env: the environment variable that switches this kernel off, named in errors.

    Raises:
      RuntimeError: no compiler, or it failed (its stderr included).
    """
    if out.exists():
        return out
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"{env}: C++ compiler {cxx!r} not found (set CXX, or {env}=0)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{env}: building {source.name} failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def switch(name: str, env: Mapping[str, str]) -> str:
    """``env[name]`` as "0" (never), "1" (always: errors say why not) or "auto" (unset or empty: auto).

    Raises:
      ValueError: anything else (names the variable).
    """
    value = env.get(name, "auto").strip().lower() or "auto"
    if value not in ("0", "1", "auto"):
        raise ValueError(f"{name}={env[name]!r}: expected 0 (never), 1 (always) or auto")
    return value
