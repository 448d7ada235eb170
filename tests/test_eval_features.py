"""The shared inference loop: outputs, the disk cache, unreadable rows, devices and precision."""

import hashlib
import logging

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import TensorDataset

from mmsoftmoe_eval.features import (
    UNREADABLE_LABEL,
    FeatureCacheKey,
    eval_mode,
    extract_features,
    load_cached,
    make_loader,
    sha256_file,
)


class CountingEncoder(nn.Module):
    """A linear encoder that counts how many batches it encoded."""

    def __init__(self, dim_in: int = 6, dim_out: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(x)


@pytest.fixture
def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(37, 6, generator=generator), torch.arange(37) % 5)


def test_features_and_labels_match_a_direct_forward(data):
    encoder = CountingEncoder()
    features, labels = extract_features(encoder, make_loader(data, batch_size=8), desc="test")
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features, encoder(data.tensors[0]).detach())
    assert torch.equal(labels, data.tensors[1])
    assert encoder.calls == 5 + 1  # ceil(37 / 8) batches, plus the reference call


def test_normalize_and_unlabelled_inputs(data):
    encoder = CountingEncoder()
    features, labels = extract_features(encoder, make_loader(TensorDataset(data.tensors[0]), 10), normalize=True)
    assert labels is None
    torch.testing.assert_close(features, F.normalize(encoder(data.tensors[0]).detach(), dim=-1))
    bare, no_labels = extract_features(encoder, make_loader(data.tensors[0], 10))
    assert no_labels is None and bare.shape == (37, 4)


def test_cache_second_call_skips_the_model(data, tmp_path):
    encoder = CountingEncoder()
    key = FeatureCacheKey(tmp_path / "cache", model="ckpt-abc:image", dataset="toy:v1", split="train")
    loader = make_loader(data, batch_size=16)
    first = extract_features(encoder, loader, cache=key)
    calls = encoder.calls
    second = extract_features(encoder, loader, cache=key)
    assert encoder.calls == calls == 3
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # The cache holds raw features; normalisation is applied after loading.
    normalized, _ = extract_features(encoder, loader, cache=key, normalize=True)
    assert encoder.calls == calls
    torch.testing.assert_close(normalized, F.normalize(first[0], dim=-1))
    # Another split or model fingerprint is another entry.
    assert load_cached(key.with_split("test")) is None
    assert load_cached(FeatureCacheKey(key.root, "ckpt-xyz:image", "toy:v1", "train")) is None


def test_sha256_file(tmp_path):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"weights" * 1000)
    assert sha256_file(path, chunk_bytes=64) == hashlib.sha256(b"weights" * 1000).hexdigest()


def test_unreadable_rows_are_dropped_and_counted(data, caplog):
    labels = data.tensors[1].clone()
    labels[[3, 20]] = UNREADABLE_LABEL
    encoder = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        features, kept = extract_features(encoder, make_loader(TensorDataset(data.tensors[0], labels), 8), desc="x")
    assert len(features) == len(kept) == 35
    assert bool((kept >= 0).all())
    assert "skipped 2 unreadable" in caplog.text


def test_accelerator_path_matches_device_path(data):
    encoder = CountingEncoder()
    loader = make_loader(data, batch_size=8)
    reference, labels = extract_features(encoder, loader, device="cpu")
    features, gathered = extract_features(encoder, loader, accelerator=Accelerator(cpu=True))
    torch.testing.assert_close(features, reference)
    assert torch.equal(gathered, labels)
    with pytest.raises(ValueError, match="either `device` or `accelerator`"):
        extract_features(encoder, loader, device="cpu", accelerator=Accelerator(cpu=True))


def test_autocast_returns_float32_close_to_full_precision(data):
    encoder = CountingEncoder()
    loader = make_loader(data, batch_size=8)
    reference, _ = extract_features(encoder, loader)
    low, _ = extract_features(encoder, loader, autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert not torch.equal(low, reference)  # it really ran in bf16
    torch.testing.assert_close(low, reference, atol=0.05, rtol=0.05)


def test_eval_mode_restores_training_and_loader_settings(data):
    model = nn.Dropout(0.5).train()
    with eval_mode(model):
        assert not model.training
    assert model.training
    loader = make_loader(data, batch_size=4, num_workers=0, device="cpu")
    assert not loader.pin_memory and loader.batch_size == 4
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(data, batch_size=0)
