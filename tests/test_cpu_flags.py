"""`atlas_jax.cpu_flags`: YNNPACK dots are added to XLA_FLAGS on CPUs where they pay, unless the user chose."""

import os
import subprocess
import sys

import pytest

from atlas_jax import cpu_flags

# Abridged /proc/cpuinfo texts of the two hosts the choice was measured on (module docstring).
AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni\n"


def test_the_flag_is_added_only_where_it_pays():
    assert cpu_flags.cpu_flag_set(AVX512_BF16) >= {"avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags.library_dots_pay(AVX2_ONLY)
    assert not cpu_flags.library_dots_pay(AVX512_BF16)
    assert not cpu_flags.library_dots_pay(None)  # no /proc/cpuinfo (not Linux): XLA's default
    assert not cpu_flags.library_dots_pay("processor\t: 0\nFeatures\t: fp asimd sve\n")  # aarch64
    env: dict[str, str] = {}
    assert not cpu_flags.with_library_dots(env, AVX512_BF16) and "XLA_FLAGS" not in env


def test_adds_the_flag_once_and_keeps_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert cpu_flags.with_library_dots(env, AVX2_ONLY)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {cpu_flags.YNN_FLAG}=dot"
    assert not cpu_flags.with_library_dots(env, AVX2_ONLY)  # already there
    assert env["XLA_FLAGS"].count(cpu_flags.YNN_FLAG) == 1


def test_the_users_choice_wins():
    mine = {"XLA_FLAGS": f"{cpu_flags.YNN_FLAG}=dot,eltwise"}
    assert not cpu_flags.with_library_dots(mine, AVX2_ONLY)
    assert mine["XLA_FLAGS"] == f"{cpu_flags.YNN_FLAG}=dot,eltwise"
    off = {cpu_flags.OPT_OUT_ENV: "0"}
    assert not cpu_flags.with_library_dots(off, AVX2_ONLY)
    assert "XLA_FLAGS" not in off
    forced = {cpu_flags.OPT_OUT_ENV: "1"}
    assert cpu_flags.with_library_dots(forced, AVX512_BF16)
    assert forced["XLA_FLAGS"] == f"{cpu_flags.YNN_FLAG}=dot"
    with pytest.raises(ValueError, match=cpu_flags.OPT_OUT_ENV):
        cpu_flags.with_library_dots({cpu_flags.OPT_OUT_ENV: "yes"}, AVX2_ONLY)


def test_importing_atlas_jax_with_the_flag_forced_and_products_stay_exact():
    """A real process: the flag is in XLA_FLAGS when JAX starts, XLA accepts it, and an f32 product of
    small integers (exact in f32) and a bf16 x bf16 -> f32 one equal numpy's."""
    code = (
        "import os, numpy as np, atlas_jax, jax, jax.numpy as jnp\n"
        "assert 'ynn_fusion_type=dot' in os.environ['XLA_FLAGS'], os.environ['XLA_FLAGS']\n"
        "r = np.random.default_rng(0)\n"
        "a, b = r.integers(-8, 8, (64, 512)).astype(np.float32), r.integers(-8, 8, (512, 96)).astype(np.float32)\n"
        "got = jax.jit(lambda x, y: x @ y)(a, b)\n"
        "assert np.array_equal(np.asarray(got), a @ b)\n"
        "f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))\n"
        "got16 = f(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))\n"
        "assert got16.dtype == jnp.float32 and np.array_equal(np.asarray(got16), a @ b)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"JAX_PLATFORMS": "cpu", cpu_flags.OPT_OUT_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
