"""The persistent compilation cache: where ``config.mesh.compilation_cache`` puts it, and that JAX writes to it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from atlas_jax import compile_cache
from configs.base import get_config


@pytest.fixture
def restore_jax_cache():
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    cc.reset_cache()


def test_settings_name_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir("run", tmp_path / "run") == tmp_path / "run" / "jax_cache"
    assert compile_cache.cache_dir("user", tmp_path) == tmp_path / "xdg" / "atlas-jax" / "jax_cache"
    assert compile_cache.cache_dir(str(tmp_path / "mine"), "x") == tmp_path / "mine"
    assert compile_cache.cache_dir("", tmp_path) is None
    assert get_config().mesh.compilation_cache == "run"  # on by default, in the run folder


def test_enabled_cache_receives_compiled_programs(tmp_path, restore_jax_cache):
    path = compile_cache.enable("run", tmp_path, min_compile_s=0.0)
    assert path == tmp_path / "jax_cache" and jax.config.jax_compilation_cache_dir == str(path)
    cc.reset_cache()  # re-read the directory setting

    @jax.jit
    def f(x):
        return jnp.sin(x) * 3.0 + jnp.arange(17.0)

    f(jnp.ones(17)).block_until_ready()
    assert any(path.iterdir()), "no cache entry written"


def test_unusable_directory_names_the_flag(tmp_path, restore_jax_cache):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"--config.mesh.compilation_cache=.*cannot create"):
        compile_cache.enable(str(blocker / "sub"), tmp_path)
