"""CLIP assembly: open_clip builds every shipped config after `import mmsoftmoe`, equal to mmsoftmoe's model;
a Hugging Face text encoder from a local folder works offline; checkpoints round-trip."""

import json

import open_clip
import pytest
import torch

import mmsoftmoe  # noqa: F401  (registers the towers in timm and the configs in open_clip)
from mmsoftmoe.checkpoint import write_manifest
from mmsoftmoe.models.accounting import count_parameters
from mmsoftmoe.models.clip import (
    build_clip,
    list_clip_models,
    load_clip,
    resolve_clip_config,
    save_clip,
)

SMALL = [n for n in list_clip_models() if "Micro" in n or "Mini" in n]
LARGE = [n for n in list_clip_models() if n not in SMALL]
CAPTIONS = ["a picture of two small red circles", "three large blue squares at the top"]


def test_configs_are_registered_in_open_clip():
    assert set(list_clip_models()) <= set(open_clip.list_models())
    assert {"SoftMoE-Micro-4-32", "SoftMoE-Mini-8-64", "SoftMoE-S-16", "SoftMoE-B-16-Sigmoid-256",
            "Dense-B-16-Sigmoid-256"} <= set(list_clip_models())


@pytest.mark.parametrize("name", SMALL)
def test_open_clip_builds_the_same_model(name):
    ours, tokenizer = build_clip(name)
    theirs, _, preprocess = open_clip.create_model_and_transforms(name)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    size = ours.visual.image_size[0]
    images, text = torch.randn(2, 3, size, size), tokenizer(CAPTIONS)
    torch.testing.assert_close(theirs.encode_image(images), ours.encode_image(images), rtol=0, atol=0)
    torch.testing.assert_close(theirs.encode_text(text), ours.encode_text(text), rtol=0, atol=0)
    torch.testing.assert_close(open_clip.get_tokenizer(name)(CAPTIONS), text)


@pytest.mark.parametrize("name", LARGE)
def test_full_size_configs_build_on_meta(name):
    with torch.device("meta"):
        theirs = open_clip.create_model(name, device="meta")
    ours, _ = build_clip(name, device="meta")
    assert count_parameters(theirs) == count_parameters(ours)
    assert (getattr(ours, "logit_bias", None) is not None) == ("Sigmoid" in name)


def test_siglip_configs_use_the_papers_init():
    model, _ = build_clip("SoftMoE-Micro-4-32-Sigmoid")
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    assert model.logit_bias.item() == -10.0


def test_save_and_load_round_trip_and_mismatch_error(tmp_path):
    model, tokenizer = build_clip("SoftMoE-Micro-4-32")
    model.eval()
    save_clip(model, resolve_clip_config("SoftMoE-Micro-4-32"), tmp_path / "a")
    loaded, _, config = load_clip(tmp_path / "a")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    assert config["preprocess_cfg"]["size"] == [32, 32]
    # Weights of another architecture under this config: a clear error, not a silent partial load.
    other, _ = build_clip("Dense-Micro-4-32")
    save_clip(other, resolve_clip_config("Dense-Micro-4-32"), tmp_path / "b")
    (tmp_path / "b" / "open_clip_config.json").write_text((tmp_path / "a" / "open_clip_config.json").read_text())
    write_manifest(tmp_path / "b")  # a consistent folder (it verifies), whose weights are of another model
    with pytest.raises(ValueError, match="does not match its config"):
        load_clip(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown CLIP model 'SoftMoE-Gigantic'"):
        build_clip("SoftMoE-Gigantic")


def _tiny_hf_encoder(folder):
    """A randomly initialised BERT with a word-level tokenizer, saved like `save_pretrained` output."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)


def test_a_meta_build_with_a_pretrained_hf_text_tower_has_the_structure_only(tmp_path, monkeypatch):
    """What a sharded run with `model.text_model` builds first (transformers refuses `from_pretrained` on the meta
    device; rank 0's full build then fills it): the same parameters, shapes and dtypes as the full build."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny_hf_encoder(tmp_path / "bert")
    meta, _ = build_clip("SoftMoE-Micro-4-32", text_model=tmp_path / "bert", device="meta")
    full, _ = build_clip("SoftMoE-Micro-4-32", text_model=tmp_path / "bert")
    assert all(p.is_meta for p in meta.parameters())
    assert {n: (p.shape, p.dtype) for n, p in meta.named_parameters()} == \
        {n: (p.shape, p.dtype) for n, p in full.named_parameters()}


def test_hf_text_encoder_from_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny_hf_encoder(tmp_path / "bert")
    model, tokenizer = build_clip("SoftMoE-Micro-4-32", text_model=tmp_path / "bert")
    tokens = tokenizer(CAPTIONS)
    assert tokens.shape == (2, 32)
    out = model(torch.randn(2, 3, 32, 32), tokens)
    assert out["text_features"].shape == (2, 64)
    out["text_features"].sum().backward()
    assert model.text.transformer.embeddings.word_embeddings.weight.grad is not None
    # The checkpoint carries the encoder's config and tokenizer (its weights are in the CLIP weights) under a
    # relative name, so it loads offline after both folders moved: no absolute path to the original encoder.
    save_clip(model, resolve_clip_config("SoftMoE-Micro-4-32", tmp_path / "bert"), tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["hf_model_name"] == "hf_text" and str(tmp_path) not in json.dumps(cfg)
    assert not list((tmp_path / "ckpt" / "hf_text").glob("*.safetensors"))
    (tmp_path / "bert").rename(tmp_path / "bert_gone")
    (tmp_path / "ckpt").rename(tmp_path / "moved")
    loaded, loaded_tokenizer, _ = load_clip(tmp_path / "moved")
    model.eval()
    assert torch.equal(loaded_tokenizer(CAPTIONS), tokens)
    torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens))
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        build_clip("SoftMoE-Micro-4-32", text_model=tmp_path / "nope")
