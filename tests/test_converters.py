"""HF <-> JAX converters on tiny random transformers models (no downloads).

Every parameter of the tiny models is re-randomised (norm scales and biases too), so a mapping
that swapped two same-shaped tensors (e.g. input_norm / post_attn_norm) could not pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from atlas_jax.checkpoint import Checkpointer
from atlas_jax.models.config import ModelConfig
from atlas_jax.models.params import build_model, flatten
from converters import cli, hf_to_jax, jax_to_hf, mapping
from converters.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsFolder, write_safetensors

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "teachers help students learn to solve problems step by step",
    "two plus two is four and three times three is nine",
] * 20
FAMILIES = [("qwen3", True), ("qwen3", False), ("qwen2", False), ("llama", True)]


def train_tokenizer(out_dir: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab <= 300) trained on CORPUS and saved into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def make_hf_model(
    out_dir: Path,
    family: str,
    tied: bool,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: Path | None = None,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 320,
) -> transformers.PreTrainedModel:
    """Saves a tiny random HF model (hidden 64, 2 heads of 32, 1 kv head) into ``out_dir``."""
    cls = {
        "qwen3": transformers.Qwen3Config,
        "qwen2": transformers.Qwen2Config,
        "llama": transformers.LlamaConfig,
    }[family]
    config = cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (out_dir / f.name).write_bytes(f.read_bytes())
    return model


def read_all(folder: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFolder(folder)
    return {k: f[k] for k in f}


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), f"{k} differs"  # bit-exact


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(d)
    return d


def no_leftovers(target: Path) -> None:
    assert not target.exists(), f"{target} was created"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")], "temp dir left"


# --------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("family", "tied"), FAMILIES)
def test_hf_jax_hf_round_trip_is_bit_exact(tmp_path: Path, tok_dir: Path, family: str, tied: bool) -> None:
    make_hf_model(tmp_path / "hf", family, tied, tokenizer_dir=tok_dir)
    assert cli.main(["hf_to_jax", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["jax_to_hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    original, back = read_all(tmp_path / "hf"), read_all(tmp_path / "back")
    assert ("lm_head.weight" in back) == (not tied)
    assert_same_tensors(original, back)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["tie_word_embeddings"] == tied and exported["dtype"] == "float32"


def test_layouts_follow_internals_md(tmp_path: Path) -> None:
    """Our kernels are [in..., out...]: q_proj[d, n, h] == HF q_proj.weight[n*H + h, d]."""
    make_hf_model(tmp_path / "hf", "qwen2", False)
    hf = read_all(tmp_path / "hf")
    cfg = ModelConfig.from_hf(tmp_path / "hf")
    flat = mapping.hf_to_flat(hf, cfg)
    h = cfg.head_dim
    w = hf["model.layers.1.self_attn.q_proj.weight"]
    # Per-layer tensors are stacked on a leading layer axis: layers/x[i] is HF model.layers.{i}.x.
    assert flat["layers/attn/q_proj/kernel"].shape == (cfg.num_layers, 64, 2, 32)
    assert flat["layers/attn/q_proj/kernel"][1, 5, 1, 7] == w[1 * h + 7, 5]
    o = hf["model.layers.0.self_attn.o_proj.weight"]  # [D, N*H]
    assert flat["layers/attn/o_proj/kernel"][0, 1, 3, 9] == o[9, 1 * h + 3]
    assert flat["layers/attn/k_proj/bias"][0, 0, 4] == hf["model.layers.0.self_attn.k_proj.bias"][4]
    assert flat["lm_head/kernel"][2, 11] == hf["lm_head.weight"][11, 2]
    assert flat["layers/mlp/down_proj/kernel"][0, 3, 2] == hf["model.layers.0.mlp.down_proj.weight"][2, 3]
    d1 = hf["model.layers.1.mlp.down_proj.weight"]
    assert flat["layers/mlp/down_proj/kernel"][1, 3, 2] == d1[2, 3]


def test_bfloat16_round_trip_keeps_dtype(tmp_path: Path, tok_dir: Path) -> None:
    make_hf_model(tmp_path / "hf", "qwen3", True, dtype=torch.bfloat16, tokenizer_dir=tok_dir)
    hf_to_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    assert hf_to_jax.read_model_config(tmp_path / "ckpt").param_dtype == "bfloat16"
    jax_to_hf.convert(tmp_path / "ckpt", tmp_path / "back")
    original = read_all(tmp_path / "hf")
    assert original["model.norm.weight"].dtype == ml_dtypes.bfloat16
    assert_same_tensors(original, read_all(tmp_path / "back"))


def test_dtype_flag_casts(tmp_path: Path) -> None:
    make_hf_model(tmp_path / "hf", "llama", False)
    hf_to_jax.convert(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    jax_to_hf.convert(tmp_path / "ckpt", tmp_path / "bf16")
    jax_to_hf.convert(tmp_path / "ckpt", tmp_path / "f32", dtype="float32")
    original = read_all(tmp_path / "hf")
    bf16, f32 = read_all(tmp_path / "bf16"), read_all(tmp_path / "f32")
    for k, x in original.items():
        assert bf16[k].dtype == ml_dtypes.bfloat16 and f32[k].dtype == np.float32
        np.testing.assert_array_equal(bf16[k], x.astype(ml_dtypes.bfloat16))  # round-to-nearest, once
        np.testing.assert_array_equal(f32[k], x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_checkpoint_with_equal_lm_head_is_accepted(tmp_path: Path) -> None:
    make_hf_model(tmp_path / "hf", "qwen3", True)
    hf = read_all(tmp_path / "hf")
    cfg = ModelConfig.from_hf(tmp_path / "hf")
    with_head = {**hf, "lm_head.weight": hf["model.embed_tokens.weight"].copy()}
    flat = mapping.hf_to_flat(with_head, cfg)
    assert "lm_head/kernel" not in flat and len(flat) == len(mapping.flat_shapes(cfg))
    with_head["lm_head.weight"] = with_head["lm_head.weight"] + 1.0
    with pytest.raises(mapping.MappingError, match=r"lm_head\.weight"):
        mapping.hf_to_flat(with_head, cfg)


# ----------------------------------------------------------------------------------------- sharding


def test_sharded_write_and_read_round_trip(tmp_path: Path, tok_dir: Path) -> None:
    make_hf_model(tmp_path / "hf", "qwen2", False, tokenizer_dir=tok_dir)
    hf_to_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    # 30 kB shards: the 320x64 fp32 embedding (80 kB) gets a shard of its own, small tensors share.
    out = jax_to_hf.convert(tmp_path / "ckpt", tmp_path / "sharded", max_shard_bytes=30_000)
    files = sorted(p.name for p in out.iterdir())
    assert INDEX_FILE in files and SINGLE_FILE not in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    original = read_all(tmp_path / "hf")
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in original.values())
    for shard in shards:  # every shard but single-tensor ones stays under the limit
        sizes = [x.nbytes for x in read_all_file(tmp_path / "sharded" / shard).values()]
        assert len(sizes) == 1 or sum(sizes) <= 30_000
    assert_same_tensors(original, read_all(tmp_path / "sharded"))
    # and reading a sharded HF folder back in (hf_to_jax over the index) is exact too
    hf_to_jax.convert(tmp_path / "sharded", tmp_path / "ckpt2")
    jax_to_hf.convert(tmp_path / "ckpt2", tmp_path / "single")
    assert (tmp_path / "single" / SINGLE_FILE).exists()
    assert_same_tensors(original, read_all(tmp_path / "single"))


def read_all_file(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_write_safetensors_rejects_duplicates(tmp_path: Path) -> None:
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        write_safetensors([("a", x), ("a", x)], tmp_path)


# ---------------------------------------------------------------------------- loads in transformers


@pytest.mark.parametrize(("family", "tied"), FAMILIES)
def test_export_loads_in_transformers_with_equal_logits(
    tmp_path: Path, tok_dir: Path, family: str, tied: bool
) -> None:
    original = make_hf_model(tmp_path / "hf", family, tied, tokenizer_dir=tok_dir)
    hf_to_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    jax_to_hf.convert(tmp_path / "ckpt", tmp_path / "back")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert type(loaded) is type(original)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    ids = torch.tensor([tokenizer.encode("the quick brown fox helps students")])
    with torch.no_grad():
        want, got = original(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # identical weights -> identical logits


# --------------------------------------------------------------------------------------- bad input


@pytest.fixture
def good_hf(tmp_path: Path) -> Path:
    make_hf_model(tmp_path / "hf", "qwen3", False)
    return tmp_path / "hf"


def _rewrite(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})


def _convert_fails(hf: Path, match: str, exc: type[Exception] = ValueError) -> None:
    out = hf.parent / "bad_ckpt"
    with pytest.raises(exc, match=match):
        hf_to_jax.convert(hf, out)
    no_leftovers(out)


def test_missing_config_json(good_hf: Path) -> None:
    (good_hf / "config.json").unlink()
    _convert_fails(good_hf, r"hf/config\.json", FileNotFoundError)


def test_corrupt_config_json(good_hf: Path) -> None:
    (good_hf / "config.json").write_text('{"model_type": "qwen3", "hidden_size": ')
    _convert_fails(good_hf, r"hf/config\.json: not a valid JSON")


def test_unknown_model_type(good_hf: Path) -> None:
    config = json.loads((good_hf / "config.json").read_text())
    (good_hf / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    _convert_fails(good_hf, r"config\.json.*'model_type'='gpt2'")


def test_missing_tensor(good_hf: Path) -> None:
    tensors = read_all(good_hf)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _rewrite(good_hf, tensors)
    _convert_fails(good_hf, r"missing.*model\.layers\.1\.mlp\.up_proj\.weight")


def test_shape_mismatch(good_hf: Path) -> None:
    tensors = read_all(good_hf)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    _rewrite(good_hf, tensors)
    _convert_fails(
        good_hf, r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 64\), expected \(32, 64\)"
    )


def test_extra_unknown_tensor(good_hf: Path) -> None:
    tensors = read_all(good_hf)
    tensors["model.layers.0.mlp.gate_proj.bias"] = np.zeros(160, np.float32)
    _rewrite(good_hf, tensors)
    _convert_fails(good_hf, r"unexpected.*model\.layers\.0\.mlp\.gate_proj\.bias")


def test_too_many_layers_in_checkpoint(good_hf: Path) -> None:
    config = json.loads((good_hf / "config.json").read_text())
    (good_hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    _convert_fails(good_hf, r"unexpected.*model\.layers\.1\.")


def test_truncated_safetensors_file(good_hf: Path) -> None:
    data = (good_hf / SINGLE_FILE).read_bytes()
    (good_hf / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    _convert_fails(good_hf, r"model\.safetensors")


def test_missing_weights(good_hf: Path) -> None:
    (good_hf / SINGLE_FILE).unlink()
    _convert_fails(good_hf, r"no model\.safetensors or model\.safetensors\.index\.json", FileNotFoundError)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    make_hf_model(tmp_path / "hf", "llama", False)
    hf_to_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    jax_to_hf.convert(tmp_path / "ckpt", tmp_path / "sharded", max_shard_bytes=30_000)
    shard = sorted(json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())["weight_map"].values())[1]
    (tmp_path / "sharded" / shard).write_bytes(b"")  # present but empty: a corrupt header
    _convert_fails(tmp_path / "sharded", re.escape(shard))
    (tmp_path / "sharded" / shard).unlink()
    _convert_fails(tmp_path / "sharded", rf"shard {re.escape(shard)}", FileNotFoundError)


def test_existing_output_is_not_touched(good_hf: Path) -> None:
    out = good_hf.parent / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        hf_to_jax.convert(good_hf, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_export_of_bad_params_writes_nothing(tmp_path: Path) -> None:
    make_hf_model(tmp_path / "hf", "qwen3", True)
    cfg = ModelConfig.from_hf(tmp_path / "hf")
    flat = mapping.hf_to_flat(read_all(tmp_path / "hf"), cfg)
    out = tmp_path / "out"
    bad = {k: v for k, v in flat.items() if k != "layers/attn/k_norm/scale"}
    with pytest.raises(mapping.MappingError, match=r"missing.*layers/attn/k_norm/scale"):
        jax_to_hf.export_hf_dir(bad, cfg, out)
    no_leftovers(out)
    bad = {**flat, "lm_head/kernel": np.zeros((64, 320), np.float32)}  # tied: no lm_head allowed
    with pytest.raises(mapping.MappingError, match=r"unexpected.*lm_head/kernel"):
        jax_to_hf.export_hf_dir(bad, cfg, out)
    bad = {**flat, "layers/attn/q_proj/kernel": np.zeros((64, 64), np.float32)}
    with pytest.raises(
        mapping.MappingError,
        match=r"'layers/attn/q_proj/kernel' has shape \(64, 64\), expected \(2, 64, 2, 32\)",
    ):
        jax_to_hf.export_hf_dir(bad, cfg, out)
    no_leftovers(out)


def test_cli_reports_errors_with_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hf_to_jax", "--hf_dir", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "nope/config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["hf_to_jax", "--hf_dir", str(tmp_path), "--out", str(tmp_path / "c"), "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    no_leftovers(tmp_path / "c")


# ------------------------------------------------------------------ our Decoder on converted weights


@nnx.jit
def _forward(model, ids, positions, mask):
    return model(ids, positions, mask)[0]


def jax_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Float32 logits ``[B, T, V]`` of our Decoder (jitted; ``mask`` 0 marks right padding)."""
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    mask = np.ones((b, t), np.int32) if mask is None else mask
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))


@pytest.mark.parametrize(("family", "tied"), FAMILIES)
def test_decoder_on_converted_weights_matches_transformers(tmp_path: Path, family: str, tied: bool) -> None:
    """The real check of the layouts: a self-inverse mapping bug would survive a round trip, not this."""
    original = make_hf_model(tmp_path / "hf", family, tied)
    hf_to_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    cfg = hf_to_jax.read_model_config(tmp_path / "ckpt")
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        model = build_model(cfg, ckpt.restore())
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 11))
    with torch.no_grad():
        want = original(torch.from_numpy(ids)).logits.numpy()
    got = jax_logits(model, ids)
    # fp32 on both sides; differences are summation-order only.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want).max() > 0.5  # logits are not trivially tiny


def test_export_from_decoder_state_is_bit_exact(tmp_path: Path, tok_dir: Path) -> None:
    """The trainer's path: jax arrays from flatten(model) -> export_hf_dir, tokenizer object given."""
    make_hf_model(tmp_path / "hf", "qwen3", False)
    cfg = ModelConfig.from_hf(tmp_path / "hf")
    model = build_model(cfg, mapping.hf_to_flat(SafetensorsFolder(tmp_path / "hf"), cfg))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    jax_to_hf.export_hf_dir(flatten(model), cfg, tmp_path / "out", tokenizer_src=tokenizer)
    assert_same_tensors(read_all(tmp_path / "hf"), read_all(tmp_path / "out"))
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert reloaded.encode("two plus two") == tokenizer.encode("two plus two")
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0


@pytest.mark.slow  # two interpreter start-ups importing jax + orbax
def test_module_entry_points_run_as_scripts(tmp_path: Path) -> None:
    """``python -m converters.jax_to_hf`` (and the atlas-convert module) parse flags and exit 2 with a message."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "converters.jax_to_hf",
        "--ckpt",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path / 'none'}: checkpoint folder does not exist" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "converters.cli", "bogus"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "invalid choice: 'bogus'" in proc.stderr
    no_leftovers(tmp_path / "o")


def test_converted_checkpoint_restores_onto_a_mesh_with_model_shardings(tmp_path: Path) -> None:
    """hf_to_jax output read straight into the model's NamedShardings on a 2x2x2 mesh of 8 CPU devices."""
    from atlas_jax.models.params import abstract_model
    from atlas_jax.models.sharding import make_mesh, state_shardings

    original = make_hf_model(tmp_path / "hf", "qwen2", False)
    hf_to_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    cfg = hf_to_jax.read_model_config(tmp_path / "ckpt")
    mesh = make_mesh((2, 2, 2))
    shardings = flatten(state_shardings(nnx.state(abstract_model(cfg)), mesh))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored = ckpt.restore(shardings=shardings)
    assert restored["lm_head/kernel"].sharding == shardings["lm_head/kernel"]
    assert any(len(s.spec) and any(s.spec) for s in shardings.values())  # something really is split
    for key, x in restored.items():
        assert x.sharding == shardings[key], key
    model = build_model(cfg, restored, mesh=mesh)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 7))
    with torch.no_grad():
        want = original(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(jax_logits(model, ids), want, rtol=1e-4, atol=1e-4)
