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
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax

from atlas_jax.cpu_flags import cpu_flag_set


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


def load(
    env: str,
    cpu_flags: Sequence[str],
    cpuinfo: str | None,
    source: Path,
    flags: Sequence[str],
    register: Callable[[str], None],
    fallback: str,
) -> bool:
    """The availability check every kernel shares: ``env`` (`switch`) wants it, ``cpuinfo`` lists ``cpu_flags``,
    and ``source`` builds (`build` into `library_path`) and ``register``s (called with the library's path).

    Returns False for "0", for a CPU without a flag under "auto", and for a failed build or registration under
    "auto" (one warning: ``fallback``, then the reason).

    Raises:
      RuntimeError: under "1", naming the missing flags or the build/registration error.
    """
    want = switch(env, os.environ)
    if want == "0":
        return False
    if not set(cpu_flags) <= cpu_flag_set(cpuinfo or ""):
        if want == "1":
            raise RuntimeError(f"{env}=1 but this CPU does not list all of {', '.join(cpu_flags)}")
        return False
    try:
        register(str(build(source, flags, library_path(source, flags), env)))
    except (RuntimeError, OSError) as e:
        if want == "1":
            raise
        warnings.warn(f"{fallback}: {e}", stacklevel=3)
        return False
    return True
