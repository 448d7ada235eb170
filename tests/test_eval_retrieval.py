"""Retrieval recall@k against a brute-force Python loop, and the model-level evaluator's plumbing."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmsoftmoe_eval.features import make_loader
from mmsoftmoe_eval.retrieval import evaluate_retrieval, retrieval_metrics


def brute_force_recall(image_features, text_features, text_to_image, k):
    """CLIP_benchmark's definitions, one query at a time with Python sorting."""
    images = F.normalize(image_features, dim=-1).tolist()
    texts = F.normalize(text_features, dim=-1).tolist()
    owner = text_to_image.tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    image_hits = []
    for t, text in enumerate(texts):
        ranked = sorted(range(len(images)), key=lambda i: -dot(text, images[i]))
        image_hits.append(owner[t] in ranked[:k])
    text_hits = []
    for i, image in enumerate(images):
        ranked = sorted(range(len(texts)), key=lambda t: -dot(image, texts[t]))
        text_hits.append(any(owner[t] == i for t in ranked[:k]))
    return sum(image_hits) / len(image_hits), sum(text_hits) / len(text_hits)


def test_recall_matches_brute_force_with_several_captions_per_image():
    generator = torch.Generator().manual_seed(0)
    num_images = 23
    captions_per_image = torch.randint(1, 5, (num_images,), generator=generator)
    text_to_image = torch.repeat_interleave(torch.arange(num_images), captions_per_image)
    image_features = torch.randn(num_images, 8, generator=generator)
    # Captions near their image, plus noise large enough that many queries miss at k=1.
    text_features = image_features[text_to_image] + 1.2 * torch.randn(len(text_to_image), 8, generator=generator)
    metrics = retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 2, 5, 10), chunk_size=4)
    for k in (1, 2, 5, 10):
        image_recall, text_recall = brute_force_recall(image_features, text_features, text_to_image, k)
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(image_recall)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(text_recall)
    assert metrics["image_retrieval_recall@1"] < 1.0 and metrics["text_retrieval_recall@1"] < 1.0


def test_captions_equal_to_their_images_give_perfect_recall_and_uncaptioned_images_raise():
    features = torch.randn(10, 6)
    text_to_image = torch.arange(10).repeat(2)
    metrics = retrieval_metrics(features, features[text_to_image], text_to_image, ks=(1,))
    assert metrics == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    with pytest.raises(ValueError, match=r"Images \[9\] have no caption"):
        retrieval_metrics(features, features[:9], torch.arange(9))


class BagOfWordsCLIP(nn.Module):
    """Image: a linear map of the pixels. Text: a sum of token embeddings. Enough to test the plumbing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(3 * 4 * 4, 8)
        self.token_embedding = nn.EmbeddingBag(49408, 8, mode="sum", padding_idx=0)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.image_proj(images.flatten(1))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.token_embedding(tokens)


def test_evaluate_retrieval_matches_direct_encoding():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    model = BagOfWordsCLIP()
    images = torch.randn(7, 3, 4, 4)
    words = ["red", "blue", "green", "small", "large", "round", "square", "dog", "cat", "car"]
    captions = [[f"a {words[i]} {words[(i + j) % 10]}" for j in range(1 + i % 3)] for i in range(7)]
    metrics = evaluate_retrieval(model, tokenizer, make_loader(images, 3), captions, batch_size=4, ks=(1, 3))
    with torch.no_grad():
        texts = [text for group in captions for text in group]
        expected = retrieval_metrics(
            model.encode_image(images), model.encode_text(tokenizer(texts)),
            torch.tensor([i for i, group in enumerate(captions) for _ in group]), ks=(1, 3),
        )
    assert metrics == pytest.approx(expected)
    with pytest.raises(ValueError, match="yielded 7 images but captions were given for 6"):
        evaluate_retrieval(model, tokenizer, make_loader(images, 3), captions[:6], ks=(1,))
