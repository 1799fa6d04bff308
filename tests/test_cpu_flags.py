"""`atlas_jax.cpu_flags`: YNNPACK dots are added to XLA_FLAGS unless the user chose otherwise."""

import os
import subprocess
import sys

from atlas_jax import cpu_flags


def test_adds_the_flag_once_and_keeps_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert cpu_flags.with_library_dots(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {cpu_flags.YNN_FLAG}=dot"
    assert not cpu_flags.with_library_dots(env)  # already there
    assert env["XLA_FLAGS"].count(cpu_flags.YNN_FLAG) == 1


def test_the_users_choice_and_the_opt_out_win():
    mine = {"XLA_FLAGS": f"{cpu_flags.YNN_FLAG}=dot,eltwise"}
    assert not cpu_flags.with_library_dots(mine)
    assert mine["XLA_FLAGS"] == f"{cpu_flags.YNN_FLAG}=dot,eltwise"
    off = {cpu_flags.OPT_OUT_ENV: "0"}
    assert not cpu_flags.with_library_dots(off)
    assert "XLA_FLAGS" not in off
    empty: dict[str, str] = {}
    assert cpu_flags.with_library_dots(empty) and empty["XLA_FLAGS"] == f"{cpu_flags.YNN_FLAG}=dot"


def test_importing_atlas_jax_sets_it_for_a_fresh_process_and_products_stay_exact():
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
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_flags.OPT_OUT_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
