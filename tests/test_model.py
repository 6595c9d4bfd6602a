"""Loading: tiny offline models go through the same from_pretrained path as real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from safegrpo_pl.policy.model import (
    DecodeIds,
    LoraSettings,
    eos_token_ids,
    load_policy,
    model_family,
    vision_token_ids,
)
from safegrpo_pl.policy.tiny_models import (
    FORMAT_TOKENS,
    TinyModelSpec,
    build_tiny_model,
    resolve_model_path,
)


def test_tiny_model_builds_identically_twice(tmp_path):
    a = build_tiny_model(tmp_path / "a", "qwen2_5_vl")
    b = build_tiny_model(tmp_path / "b", "qwen2_5_vl")
    tok_a = json.loads((a / "tokenizer.json").read_text())
    tok_b = json.loads((b / "tokenizer.json").read_text())
    assert tok_a == tok_b, "tokenizer training is not deterministic"
    wa = load_policy(str(a)).state_dict()
    wb = load_policy(str(b)).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "random weights depend on more than the seed"


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_text"])
def test_tiny_model_reloads_by_path_with_its_family(tmp_path, arch):
    path = build_tiny_model(tmp_path / arch, arch)
    model = load_policy(str(path))
    expected = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_text": "text"}[arch]
    assert model_family(model.config) == expected
    assert model.training, "a loaded policy must be in train mode"


def test_format_tags_are_single_tokens_that_survive_decoding(tiny_qwen25vl_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen25vl_path)
    text = "<think><visual_safe>unsafe</visual_safe></think><answer>ok</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for tag in FORMAT_TOKENS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    assert tokenizer.decode(ids, skip_special_tokens=True) == text, "format tags lost in decoding"


def test_vision_and_eos_token_ids_are_found(tiny_qwen25vl_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen25vl_path)
    vision = vision_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") in vision
    eos = eos_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert not set(vision) & set(eos)


def test_decode_ids_pad_falls_back_to_eos_and_never_ending_suppresses_every_eos(
    tiny_qwen25vl_path,
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen25vl_path)
    ids = DecodeIds.of(tokenizer)
    assert ids.pad == tokenizer.pad_token_id
    assert ids.eos == eos_token_ids(tokenizer) and ids.suppress == vision_token_ids(tokenizer)
    tokenizer.pad_token = None
    assert DecodeIds.of(tokenizer).pad == ids.eos[0], "no pad token: a finished row needs an id"
    endless = ids.never_ending()
    assert set(endless.suppress) == set(ids.suppress) | set(ids.eos)
    assert endless.eos == ids.eos, "EOS ids still end rows if ever sampled"
    assert endless.sampling_kwargs()["suppress_token_ids"] == endless.suppress


def test_tiny_spec_parses_options():
    spec = TinyModelSpec.parse("tiny:qwen3_vl?hidden_size=128&num_layers=3")
    assert (spec.arch, spec.hidden_size, spec.num_layers) == ("qwen3_vl", 128, 3)
    with pytest.raises(ValueError, match="unknown tiny-model option 'hiden_size'"):
        TinyModelSpec.parse("tiny:qwen3_vl?hiden_size=128")


def test_tiny_prefix_resolves_to_a_cached_folder_built_once():
    first = resolve_model_path("tiny:qwen3_text?hidden_size=32")
    second = resolve_model_path("tiny:qwen3_text?hidden_size=32")
    assert first == second, "the cache key is not stable"
    assert resolve_model_path("some/hub-id") == "some/hub-id"


def test_lora_trains_only_adapters_and_disabling_gives_the_base(tiny_qwen25vl_path):
    torch.manual_seed(0)
    base = load_policy(str(tiny_qwen25vl_path))
    model = load_policy(str(tiny_qwen25vl_path), lora=LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:5]
    assert not any("visual" in n for n in trainable), (
        "default LoRA targets leak into the vision tower"
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # move the adapters away from their zero start
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=ids).logits
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
    torch.testing.assert_close(ref, plain, atol=1e-6, rtol=0)
    assert not torch.allclose(adapted, plain), "adapters had no effect"


def test_lora_targets_that_match_nothing_fail_clearly(tiny_qwen25vl_path):
    with pytest.raises(ValueError, match="match no module"):
        load_policy(str(tiny_qwen25vl_path), lora=LoraSettings(target_modules=["no_such_proj"]))


def test_4bit_without_lora_is_refused(tiny_qwen25vl_path):
    with pytest.raises(ValueError, match="needs LoRA"):
        load_policy(str(tiny_qwen25vl_path), load_in_4bit=True)
