"""Architectures routescope cannot decompose exactly are refused at load time, by name and reason.

Two gates (``workers/support.py``): known families by their config and modules, and, for any
family nobody listed, a probe forward whose readings must add up (SPEC 3-4 invariants). The
second gate is tested with the first switched off: it alone must catch the same families.
"""

from __future__ import annotations

import pytest
import torch

from routescope.cluster.pipeline import Pipeline
from routescope.workers import support
from routescope.workers.checkpoint import Checkpoint
from routescope.workers.tiny import train_tokenizer

SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4)


def _configs(vocab: int) -> dict:
    import transformers as T

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2, **SMALL)
    return {
        "gemma2": T.Gemma2Config(intermediate_size=64, num_key_value_heads=2, head_dim=8, **common),
        "olmo2": T.Olmo2Config(intermediate_size=64, **common),
        "falcon_new": T.FalconConfig(num_kv_heads=2, new_decoder_architecture=True, **common),
        "opt_post_ln": T.OPTConfig(ffn_dim=64, do_layer_norm_before=False, word_embed_proj_dim=16, **common),
    }


REASONS = {
    "falcon_new": "FalconForCausalLM: Falcon's new decoder layout (new_decoder_architecture=True)",
    "opt_post_ln": "OPTForCausalLM: post-LN blocks (do_layer_norm_before=False, SPEC 4a)",
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer()
    root = tmp_path_factory.mktemp("unsupported")
    out = {}
    for name, cfg in _configs(len(tok)).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(REASONS))
def test_unsupported_architecture_is_refused_with_its_name_and_reason(model_dirs, name):
    with pytest.raises(support.UnsupportedModelError) as err:
        Pipeline.local(Checkpoint(model_dirs[name], name))
    assert REASONS[name] in str(err.value)
    assert "refuses it rather than trace contributions that do not add up" in str(err.value)


@pytest.mark.parametrize("name,message", [
    ("gemma2", "layer 0: the attention parts pattern * (v @ W_O) do not add up to the attention output"),
    ("olmo2", "layer 0: the attention parts pattern * (v @ W_O) do not add up to the attention output"),
    ("opt_post_ln", "layer 0: the residual after attention / after the layer is not the sum of its parts"),
])
def test_the_probe_alone_refuses_blocks_whose_parts_do_not_add_up(model_dirs, monkeypatch, name, message):
    """With the known-family gate off, and for Gemma-2 / OLMo-2 without the linearised norms of
    SPEC 4a, the probe sees parts that do not add up and refuses."""
    from routescope.workers import bridge_adapter

    monkeypatch.setattr(support, "check_architecture", lambda config, model: None)
    monkeypatch.setattr(bridge_adapter, "_block_norms", lambda model, d_model: None)
    with pytest.raises(support.UnsupportedModelError, match="SPEC|sum of its parts") as err:
        Pipeline.local(Checkpoint(model_dirs[name], name))
    assert message in str(err.value)


def test_norms_inside_blocks_pass_the_probe_once_linearised(model_dirs):
    for name in ("gemma2", "olmo2"):
        pipe = Pipeline.local(Checkpoint(model_dirs[name], name), layers="0-0,1-1")
        assert pipe.trace("The capital of France is").n_tokens > 1


def test_supported_models_pass_the_probe_on_every_stage(tiny_dirs):
    for arch in ("gpt2", "llama", "opt", "neox"):
        pipe = Pipeline.local(Checkpoint(tiny_dirs[arch], arch), layers="0-1,2-3")  # first and later stages
        assert pipe.trace("The capital of France is").n_tokens > 1
