"""An unbounded generated recognition task that rewards memory: random glyphs, optionally dealt into classes.

The small-scale study (benchmarks/study.py, issue 13) needs a task where more parameters at equal FLOPs can help,
as JFT does for Puigcerver et al. 2024 (section 3: Soft MoE is data-hungry; its gain is parameters at equal cost).
Shapes of a few colours are learned from a handful of images and leave extra experts nothing to store; here the
model must memorise a vocabulary of `num_glyphs` arbitrary patterns (random binary masks in random colours, fixed
by `vocab_seed`) and find several of them per image. By default they are pasted at uniformly random pixel offsets,
so a glyph rarely lines up with the patch grid and is often split over two to four patches; `grid` snaps the offsets
(with `grid = glyph_size = patch size` every glyph fills one patch). With `num_classes` the glyphs are dealt into
classes and the labels name classes: a lookup table from patterns to classes, behind a narrow output. Later glyphs
are drawn over earlier ones. Pixel noise is added to the whole image.

Batches are drawn on the fly, vectorised in torch: batch `step` of stream `seed` depends on (seed, step) alone, so
every variant of a study sees the same stream, and a held-out set is the same generator under a different seed.
Labels are multi-hot over the classes (sigmoid cross-entropy, as the paper's JFT pretraining).
"""

from __future__ import annotations

import numpy as np
import torch


def _generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (numpy's SeedSequence mixes them)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class GlyphTask:
    """Generates (images, multi-hot labels) batches; see the module docstring.

    Args:
        num_glyphs: Vocabulary size (the classes, unless `num_classes` groups them).
        glyphs_per_image: Distinct glyphs pasted into each image.
        img_size: Side of the square image, pixels.
        glyph_size: Side of a glyph, pixels.
        density: Probability that a glyph pixel is on.
        noise_std: Std of the Gaussian pixel noise, on the [-1, 1] image scale.
        vocab_seed: Seed of the glyph vocabulary (the "world"); streams differ by their own seed.
        num_classes: Labels: None (default) makes every glyph its own class; otherwise the glyphs are dealt at random
            (fixed by `vocab_seed`) into `num_classes` equal classes, and an image holds glyphs of k distinct classes,
            each a random member of its class: the model must store which class each of `num_glyphs` arbitrary
            patterns belongs to (a lookup table, the memory that MLP and expert parameters hold), while its output
            stays `num_classes` wide.
        grid: Offsets are multiples of `grid` pixels: 1 (default) places glyphs anywhere; the patch size with
            `glyph_size` equal to it puts each glyph in exactly one patch.
    """

    def __init__(self, *, num_glyphs: int = 256, glyphs_per_image: int = 3, img_size: int = 32,
                 glyph_size: int = 6, density: float = 0.5, noise_std: float = 0.2, vocab_seed: int = 0, grid: int = 1,
                 num_classes: int | None = None) -> None:
        num_classes = num_glyphs if num_classes is None else num_classes
        if num_classes < 1 or num_glyphs % num_classes:
            raise ValueError(f"num_classes ({num_classes}) must divide num_glyphs ({num_glyphs})")
        if glyphs_per_image > num_classes:
            raise ValueError(f"glyphs_per_image ({glyphs_per_image}) must not exceed the classes ({num_classes})")
        if glyph_size > img_size:
            raise ValueError(f"glyph_size ({glyph_size}) must not exceed img_size ({img_size})")
        if grid < 1:
            raise ValueError(f"grid must be a positive number of pixels, got {grid}")
        self.num_glyphs, self.glyphs_per_image, self.grid = num_glyphs, glyphs_per_image, grid
        self.img_size, self.glyph_size, self.noise_std = img_size, glyph_size, noise_std
        g = _generator(vocab_seed, 0x61797068)
        mask_gss = torch.rand(num_glyphs, glyph_size, glyph_size, generator=g) < density
        self.mask_gss = mask_gss
        self.colour_g3 = torch.rand(num_glyphs, 3, generator=g) * 2 - 1
        self.num_classes = num_classes
        # members_cm[c] are the glyphs of class c; class_of_glyph inverts it.
        self.members_cm = torch.randperm(num_glyphs, generator=g).view(num_classes, num_glyphs // num_classes)
        self.class_of_glyph = torch.empty(num_glyphs, dtype=torch.long)
        self.class_of_glyph[self.members_cm.flatten()] = torch.arange(num_classes).repeat_interleave(
            num_glyphs // num_classes)

    def batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (b, 3, s, s) in [-1, 1]-ish, multi-hot labels (b, classes), and the glyph offsets (b, k, 2) (y, x)."""
        g = _generator(seed, step)
        b, k, s, gs = batch_size, self.glyphs_per_image, self.img_size, self.glyph_size
        # k distinct glyphs per image: the first k of a random permutation (argsort of uniform noise).
        if self.num_classes == self.num_glyphs:
            ids_bk = torch.rand(b, self.num_glyphs, generator=g).argsort(dim=1)[:, :k]
            classes_bk = ids_bk
        else:  # k distinct classes, then one random member glyph of each
            classes_bk = torch.rand(b, self.num_classes, generator=g).argsort(dim=1)[:, :k]
            member_bk = torch.randint(0, self.members_cm.shape[1], (b, k), generator=g)
            ids_bk = self.members_cm[classes_bk, member_bk]
        offsets_bk2 = torch.randint(0, (s - gs) // self.grid + 1, (b, k, 2), generator=g) * self.grid
        background_b3 = (torch.rand(b, 3, generator=g) - 0.5) * 0.4
        images = background_b3[:, :, None, None].expand(b, 3, s, s).clone()
        noise = torch.randn(b, 3, s, s, generator=g) * self.noise_std
        rows = torch.arange(gs)
        batch_index = torch.arange(b)
        for j in range(k):  # k is a handful; everything else is vectorised over the batch and the glyph pixels
            mask_bgg = self.mask_gss[ids_bk[:, j]]
            y_bg = offsets_bk2[:, j, 0, None] + rows  # (b, gs) pixel rows covered by glyph j
            x_bg = offsets_bk2[:, j, 1, None] + rows
            patch = images[batch_index[:, None, None], :, y_bg[:, :, None], x_bg[:, None, :]]  # (b, gs, gs, 3)
            colour = self.colour_g3[ids_bk[:, j]][:, None, None, :]
            patch = torch.where(mask_bgg[..., None], colour, patch)
            images[batch_index[:, None, None], :, y_bg[:, :, None], x_bg[:, None, :]] = patch
        labels = torch.zeros(b, self.num_classes).scatter_(1, classes_bk, 1.0)
        return images + noise, labels, offsets_bk2

    def held_out(self, seed: int, size: int, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed evaluation set of `size` images from stream `seed` (use a seed no training stream uses)."""
        parts = [self.batch(seed, i, min(batch_size, size - i * batch_size))[:2]
                 for i in range((size + batch_size - 1) // batch_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def top_k_recall(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of its k true glyphs among its k highest logits (k = the image's label count)."""
    k = int(labels.sum(dim=1).max())
    top = logits.topk(k, dim=1).indices
    return labels.gather(1, top).sum(dim=1) / labels.sum(dim=1)
