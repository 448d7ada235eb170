"""Zero-shot classification: a constructed model scores 100%, shuffled labels score chance, metrics match references."""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import TensorDataset

from mmsoftmoe_eval.features import make_loader
from mmsoftmoe_eval.metrics import classification_metrics
from mmsoftmoe_eval.zero_shot import evaluate_zero_shot, zero_shot_classifier, zero_shot_metrics

CLASSNAMES = ["apple", "bicycle", "cloud", "dolphin", "engine", "forest", "guitar", "harbour", "island", "jacket"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


class PromptMatchedCLIP(nn.Module):
    """Text: a random bag of token embeddings. Image: an integer class id, embedded as that class's prompt direction.

    ``image_table[c]`` is computed here, independently of open_clip's builder, as the re-normalised mean of the
    normalised embeddings of class c's prompts: the zero-shot answer is correct by construction.
    """

    def __init__(self, tokenizer, dim: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.token_embedding = nn.EmbeddingBag(49408, dim, mode="sum", padding_idx=0)
        with torch.no_grad():
            prompts = [[t.format(c) for t in TEMPLATES] for c in CLASSNAMES]
            text = torch.stack([F.normalize(self.encode_text(tokenizer(p)), dim=-1).mean(0) for p in prompts])
        self.register_buffer("image_table", 3.0 * F.normalize(text, dim=-1))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.token_embedding(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_table[images.long()]
        return F.normalize(features, dim=-1) if normalize else features


def test_constructed_model_scores_100_and_shuffled_labels_score_chance(tokenizer):
    model = PromptMatchedCLIP(tokenizer)
    labels = torch.arange(400) % len(CLASSNAMES)
    loader = make_loader(TensorDataset(labels.clone(), labels), batch_size=64)
    metrics = evaluate_zero_shot(model, tokenizer, loader, CLASSNAMES, TEMPLATES)
    assert metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}

    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    loader = make_loader(TensorDataset(labels.clone(), shuffled), batch_size=64)
    chance = evaluate_zero_shot(model, tokenizer, loader, CLASSNAMES, TEMPLATES)
    assert chance["acc1"] < 0.2 and chance["mean_per_class_recall"] < 0.2  # chance is 0.1
    assert 0.3 < chance["acc5"] < 0.7  # chance is 0.5


def test_classifier_matches_open_clip_legacy_builder(tokenizer):
    model = PromptMatchedCLIP(tokenizer)
    weights = zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES, classes_per_batch=3)
    legacy = open_clip.build_zero_shot_classifier_legacy(model, tokenizer, CLASSNAMES, TEMPLATES)
    assert weights.shape == (24, len(CLASSNAMES))
    torch.testing.assert_close(weights, legacy)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_against_hand_computation_and_sklearn():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 8, generator=generator)
    labels = torch.randint(0, 7, (300,), generator=generator)  # class 7 never occurs in the labels
    metrics = classification_metrics(logits, labels)
    ranking = logits.argsort(dim=1, descending=True).tolist()
    top1 = np.mean([ranks[0] == y for ranks, y in zip(ranking, labels.tolist(), strict=True)])
    top5 = np.mean([y in ranks[:5] for ranks, y in zip(ranking, labels.tolist(), strict=True)])
    assert metrics["acc1"] == pytest.approx(top1)
    assert metrics["acc5"] == pytest.approx(top5)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


def test_fewer_than_five_classes_warns_and_bad_labels_raise():
    logits, labels = torch.randn(10, 3), torch.arange(10) % 3
    with pytest.warns(UserWarning, match="top-3"):
        assert classification_metrics(logits, labels)["acc5"] == 1.0
    with pytest.raises(ValueError, match="only 3 classes"):
        classification_metrics(logits, labels + 1)
    with pytest.raises(ValueError, match="width"):
        zero_shot_metrics(torch.randn(10, 5), labels, F.normalize(torch.randn(4, 3), dim=0))


def test_tiny_open_clip_end_to_end(tokenizer):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).train()
    images, labels = torch.randn(12, 3, 32, 32), torch.arange(12) % 3
    names = ["cat", "dog", "bird"]
    with pytest.warns(UserWarning, match="top-3"):
        metrics = evaluate_zero_shot(model, tokenizer, make_loader(TensorDataset(images, labels), 5), names, TEMPLATES)
    assert model.training  # the evaluator restored the caller's mode
    model.eval()
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier_legacy(model, tokenizer, names, TEMPLATES)
        predictions = (F.normalize(model.encode_image(images), dim=-1) @ classifier).argmax(1)
    assert metrics["acc1"] == pytest.approx((predictions == labels).float().mean().item())
