"""ModelConfig <-> HF config.json: parsing each family, export that transformers/vLLM load, clear errors."""

import json

import pytest
import transformers
from _model_hf import FAMILIES, LLAMA3_ROPE, hf_config

from atlas_jax.models.config import ModelConfig, RopeScaling
from atlas_jax.models.presets import PRESETS, TINY_LLAMA, get_preset
from converters.mapping import expand


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_reads_saved_transformers_config(family, tmp_path):
    hf = hf_config(family)
    hf.save_pretrained(tmp_path)
    from_dir = ModelConfig.from_hf(tmp_path)
    assert ModelConfig.from_hf(tmp_path / "config.json") == from_dir
    assert ModelConfig.from_hf(hf.to_dict()) == from_dir
    assert from_dir.model_type == hf.model_type
    assert (from_dir.num_heads, from_dir.num_kv_heads, from_dir.head_dim) == (2, 1, 32)
    assert from_dir.tie_word_embeddings == (family == "qwen3_tied")
    assert from_dir.qk_norm == family.startswith("qwen3")
    assert from_dir.qkv_bias == (family == "qwen2")
    if family == "llama3":
        assert from_dir.rope_theta == 500000.0
        assert from_dir.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
    else:
        assert from_dir.rope_theta == 1e6 and from_dir.rope_scaling is None


def test_from_hf_reads_legacy_rope_keys():
    legacy = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 5e5,
        "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
        "eos_token_id": [7, 9],
    }
    cfg = ModelConfig.from_hf(legacy)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.original_max_position_embeddings == 16
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 32  # HF defaults: K = N, H = D / N
    assert cfg.eos_token_id == (7, 9) and cfg.eos_token_ids == (7, 9)
    hash(cfg)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_roundtrips_and_loads_in_transformers(name, tmp_path):
    cfg = get_preset(name)
    exported = cfg.to_hf()
    assert ModelConfig.from_hf(exported) == cfg
    (tmp_path / "config.json").write_text(json.dumps(exported))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == cfg.model_type and hf.architectures == exported["architectures"]
    assert hf.num_key_value_heads == cfg.num_kv_heads and hf.tie_word_embeddings == cfg.tie_word_embeddings
    assert getattr(hf, "head_dim", cfg.hidden_size // cfg.num_heads) == cfg.head_dim
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert ModelConfig.from_hf(hf.to_dict()) == cfg


@pytest.mark.parametrize("name", ["tiny_qwen3", "tiny_qwen3_untied", "tiny_qwen2", "tiny_llama"])
def test_exported_config_builds_hf_model_with_the_mapped_tensor_names(name, tmp_path):
    cfg = get_preset(name)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    names = set(model.state_dict())
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")
    assert names == {e.hf for e in expand(cfg)}
    if name == "tiny_llama":
        assert model.config.rope_parameters["rope_type"] == "llama3"


def _write(tmp_path, text: str):
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def test_from_hf_errors_name_file_and_field(tmp_path):
    good = hf_config("qwen3_untied").to_dict()
    with pytest.raises(ValueError, match=r"nope: cannot read HF config"):
        ModelConfig.from_hf(tmp_path / "nope")
    path = _write(tmp_path, "{not json")
    with pytest.raises(ValueError, match=rf"{path}: not a valid JSON"):
        ModelConfig.from_hf(path)
    with pytest.raises(ValueError, match="must hold a JSON object"):
        ModelConfig.from_hf(_write(tmp_path, "[1, 2]"))
    with pytest.raises(ValueError, match=rf"{path}: missing required field 'hidden_size'"):
        ModelConfig.from_hf(
            _write(tmp_path, json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
        )
    with pytest.raises(ValueError, match=r"'model_type'='gpt2' is not supported"):
        ModelConfig.from_hf({**good, "model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"'vocab_size'='many' is not a valid int"):
        ModelConfig.from_hf({**good, "vocab_size": "many"})
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_type'='yarn' is not supported"):
        ModelConfig.from_hf(
            {**good, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
        )
    llama = hf_config("llama3").to_dict()
    rope = {k: v for k, v in llama["rope_parameters"].items() if k != "low_freq_factor"}
    with pytest.raises(ValueError, match=r"missing required field 'rope_parameters\.low_freq_factor'"):
        ModelConfig.from_hf({**llama, "rope_parameters": rope})
    with pytest.raises(ValueError, match=r"missing required field 'rope_parameters\.rope_theta'"):
        ModelConfig.from_hf({**good, "rope_parameters": None, "rope_theta": None})
    with pytest.raises(ValueError, match="'attention_bias'=true is not supported"):
        ModelConfig.from_hf({**good, "attention_bias": True})
    with pytest.raises(ValueError, match="'use_sliding_window'=true"):
        ModelConfig.from_hf({**good, "use_sliding_window": True})
    with pytest.raises(ValueError, match="'hidden_act'='gelu'"):
        ModelConfig.from_hf({**good, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        ModelConfig.from_hf({**good, "num_key_value_heads": 3, "num_attention_heads": 4})


def test_model_config_validation():
    with pytest.raises(ValueError, match=r"dtype='float16'"):
        TINY_LLAMA.replace(dtype="float16")
    with pytest.raises(ValueError, match="head_dim=31"):
        TINY_LLAMA.replace(head_dim=31)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**TINY_LLAMA.to_dict(), "n_layers": 3})
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
        get_preset("qwen9")
    assert ModelConfig.from_dict(TINY_LLAMA.to_dict()) == TINY_LLAMA


def test_model_config_files_match_presets():
    import importlib

    for name, preset in PRESETS.items():
        module = importlib.import_module(f"configs.model.{name}")
        cd = module.get_config()
        assert ModelConfig.from_dict(cd) == preset
        cd.num_layers = 1  # ConfigDict fields are overridable from the command line
        assert ModelConfig.from_dict(cd).num_layers == 1


@pytest.mark.vllm
def test_vllm_reads_exported_configs(tmp_path):
    from vllm.config import ModelConfig as VllmModelConfig

    for name in ("tiny_qwen3", "tiny_qwen2", "tiny_llama"):
        cfg = get_preset(name)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg.to_hf()))
        vcfg = VllmModelConfig(model=str(tmp_path / name), skip_tokenizer_init=True, dtype="float32")
        assert vcfg.hf_config.architectures == cfg.to_hf()["architectures"]
        assert vcfg.get_head_size() == cfg.head_dim
        assert vcfg.get_total_num_kv_heads() == cfg.num_kv_heads
        assert vcfg.get_vocab_size() == cfg.vocab_size
        assert vcfg.hf_config.rope_parameters["rope_theta"] == cfg.rope_theta
        if cfg.rope_scaling is not None:
            assert vcfg.hf_config.rope_parameters["rope_type"] == "llama3"
