"""Zero-shot image-text retrieval: recall@k in both directions, with several captions per image.

Metric definitions follow CLIP_benchmark (``clip_benchmark/metrics/zeroshot_retrieval.py``), i.e. the CLIP-paper
convention rather than "true" recall:

- ``image_retrieval_recall@k``: for each *text* query, 1 if its image is among the k images scored highest.
- ``text_retrieval_recall@k``: for each *image* query, 1 if *any* of its captions is among the k texts scored highest.

Both are averaged over the queries. CLIP_benchmark builds the full score matrix plus a one-hot ``[queries, k,
candidates]`` tensor; here each query's hit is decided from one rank (candidates scoring strictly above its best
positive), computed in chunks of queries so memory stays at ``chunk_size x candidates``. Exact score ties, which
``torch.topk`` breaks arbitrarily, count in the query's favour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmsoftmoe_eval.features import FeatureCacheKey, eval_mode, extract_features, make_loader, resolve_device

DEFAULT_KS = (1, 5, 10)


def _text_query_ranks(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """For each text, how many images score strictly higher than its own image."""
    ranks = []
    for start in range(0, len(text_features), chunk_size):
        scores_ti = text_features[start:start + chunk_size] @ image_features.T
        positive_t1 = scores_ti.gather(1, text_to_image[start:start + chunk_size, None])
        ranks.append((scores_ti > positive_t1).sum(1))
    return torch.cat(ranks)


def _image_query_ranks(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """For each image, how many texts score strictly higher than its best-scoring caption."""
    ranks = []
    for start in range(0, len(image_features), chunk_size):
        scores_it = image_features[start:start + chunk_size] @ text_features.T
        image_ids_i1 = torch.arange(start, start + len(scores_it), device=scores_it.device)[:, None]
        best_positive_i1 = scores_it.masked_fill(text_to_image[None, :] != image_ids_i1, -torch.inf).amax(1, True)
        ranks.append((scores_it > best_positive_i1).sum(1))
    return torch.cat(ranks)


def _check_pairing(num_images: int, text_to_image: torch.Tensor) -> None:
    if text_to_image.numel() and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images):
        raise ValueError(f"text_to_image must index the {num_images} images (0..{num_images - 1}).")
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    if bool((captions_per_image == 0).any()):
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise ValueError(f"Images {missing} have no caption; every image needs at least one for retrieval.")


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image- and text-retrieval recall@k (CLIP_benchmark semantics, see the module docstring).

    Args:
        image_features: ``[Ni, e]`` image embeddings (normalised here).
        text_features: ``[Nt, e]`` caption embeddings (normalised here).
        text_to_image: ``[Nt]`` index of each caption's image.
        ks: The k values.
        chunk_size: Queries scored at once.
    """
    text_to_image = text_to_image.long().to(image_features.device)
    _check_pairing(len(image_features), text_to_image)
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1).to(image_features.device)
    text_ranks = _text_query_ranks(image_features, text_features, text_to_image, chunk_size)
    image_ranks = _image_query_ranks(image_features, text_features, text_to_image, chunk_size)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (text_ranks < k).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (image_ranks < k).float().mean().item()
    return metrics


def evaluate_retrieval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    image_loader: DataLoader,
    captions: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    ks: Sequence[int] = DEFAULT_KS,
    device: torch.device | str | None = None,
    accelerator: Accelerator | None = None,
    autocast_dtype: torch.dtype | None = None,
    image_cache: FeatureCacheKey | None = None,
    text_cache: FeatureCacheKey | None = None,
) -> dict[str, float]:
    """Retrieval recall@k of ``model`` on images and their captions.

    Args:
        model: CLIP-style model with ``encode_image`` and ``encode_text``, on the evaluation device.
        tokenizer: Maps a list of strings to a ``[b, ctx]`` token tensor.
        image_loader: Yields image batches (or ``(images, anything)``) in the order of ``captions``, unshuffled.
        captions: ``captions[i]`` holds the one or more captions of image ``i``.
        batch_size: Captions encoded per batch.
        ks: The k values.
        device: Device when no accelerator is given.
        accelerator: Supplies device, sharding and precision.
        autocast_dtype: Autocast dtype without an accelerator.
        image_cache: Feature cache entry for the images.
        text_cache: Feature cache entry for the captions (its model key must name the text tower).
    """
    text_to_image = torch.tensor([i for i, texts in enumerate(captions) for _ in texts], dtype=torch.long)
    tokens = tokenizer([text for texts in captions for text in texts])
    target = resolve_device(device, accelerator)
    text_loader = make_loader(TensorDataset(tokens, text_to_image), batch_size, device=target)
    common = dict(device=device, accelerator=accelerator, autocast_dtype=autocast_dtype)
    with eval_mode(model):
        image_features, _ = extract_features(model.encode_image, image_loader, desc="retrieval images",
                                             cache=image_cache, **common)
        text_features, text_to_image = extract_features(model.encode_text, text_loader, desc="retrieval captions",
                                                        cache=text_cache, **common)
    if len(image_features) != len(captions):
        raise ValueError(
            f"The image loader yielded {len(image_features)} images but captions were given for {len(captions)}: "
            "pass one caption list per image, in loader order."
        )
    return retrieval_metrics(image_features, text_features, text_to_image, ks)
