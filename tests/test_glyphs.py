"""The glyph task: deterministic in (seed, step), fresh per step, off or on the patch grid, labels match the pixels."""

from __future__ import annotations

import pytest
import torch

from mmsoftmoe.data.glyphs import GlyphTask, top_k_recall


def test_batches_are_a_function_of_seed_and_step():
    task = GlyphTask(num_glyphs=64, glyphs_per_image=3)
    a, la, oa = task.batch(seed=0, step=5, batch_size=16)
    b, lb, ob = GlyphTask(num_glyphs=64, glyphs_per_image=3).batch(seed=0, step=5, batch_size=16)
    assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(oa, ob)
    for other in (task.batch(seed=0, step=6, batch_size=16), task.batch(seed=1, step=5, batch_size=16)):
        assert not torch.equal(a, other[0]) and not torch.equal(la, other[1])


def test_held_out_set_is_its_own_stream():
    task = GlyphTask(num_glyphs=64)
    images, labels = task.held_out(seed=99, size=250, batch_size=100)
    assert images.shape == (250, 3, 32, 32) and labels.shape == (250, 64)
    first = task.batch(99, 0, 100)[0]
    assert torch.equal(images[:100], first)
    assert not any(torch.equal(images[:100], task.batch(s, 0, 100)[0]) for s in range(3))


def test_labels_are_k_distinct_glyphs():
    task = GlyphTask(num_glyphs=32, glyphs_per_image=4)
    _, labels, _ = task.batch(0, 0, 200)
    assert torch.equal(labels.sum(dim=1), torch.full((200,), 4.0))
    assert set(labels.unique().tolist()) == {0.0, 1.0}


def test_offsets_are_off_the_patch_grid():
    task = GlyphTask(img_size=32, glyph_size=6)
    _, _, offsets = task.batch(0, 0, 500)
    assert offsets.min() >= 0 and offsets.max() <= 32 - 6
    assert (offsets % 4 != 0).float().mean() > 0.6  # patch size 4: most glyph corners fall inside a patch
    assert len(offsets.unique()) == 27  # every offset 0..26 occurs


def test_glyph_pixels_are_drawn_where_the_offsets_say():
    task = GlyphTask(num_glyphs=8, glyphs_per_image=1, noise_std=0.0)
    images, labels, offsets = task.batch(0, 0, 20)
    for image, label, (y, x) in zip(images, labels, offsets[:, 0], strict=True):
        glyph = int(label.argmax())
        window = image[:, y:y + 6, x:x + 6]
        mask = task.mask_gss[glyph]
        assert torch.allclose(window[:, mask], task.colour_g3[glyph][:, None].expand(3, int(mask.sum())))


def test_top_k_recall_by_hand():
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0], [0.0, 3.0, 1.0, 2.0]])
    assert torch.equal(top_k_recall(logits, labels), torch.tensor([0.5, 1.0]))


def test_grid_puts_each_glyph_in_one_patch():
    task = GlyphTask(num_glyphs=16, glyphs_per_image=2, glyph_size=4, grid=4, noise_std=0.0)
    images, labels, offsets = task.batch(0, 0, 300)
    assert set(offsets.unique().tolist()) == set(range(0, 29, 4))  # patch corners only, every one of them
    # A glyph's pixels lie inside the one 4x4 patch at its offset: outside every pasted glyph the image is background.
    covered = torch.zeros(300, 32, 32, dtype=torch.bool)
    for i in range(300):
        for y, x in offsets[i].tolist():
            covered[i, y:y + 4, x:x + 4] = True
    background = images[:, :, 0, 0].clone()
    for i in range(300):  # (0, 0) may be covered; take a background pixel from an uncovered place
        y, x = (~covered[i]).nonzero()[0].tolist()
        background[i] = images[i, :, y, x]
    expected = background[:, None, None, :].expand(300, 32, 32, 3)
    assert torch.equal(images.permute(0, 2, 3, 1)[~covered], expected[~covered])
    with pytest.raises(ValueError, match="grid"):
        GlyphTask(grid=0)


def test_classes_group_glyphs_and_labels_name_the_classes_drawn():
    task = GlyphTask(num_glyphs=64, num_classes=8, glyphs_per_image=3, glyph_size=4, grid=4, noise_std=0.0)
    assert sorted(task.members_cm.flatten().tolist()) == list(range(64))  # every glyph in exactly one class
    assert all((task.class_of_glyph[task.members_cm[c]] == c).all() for c in range(8))
    images, labels, offsets = task.batch(0, 0, 100)
    assert labels.shape == (100, 8) and torch.equal(labels.sum(dim=1), torch.full((100,), 3.0))
    # Read the glyphs back from the pixels (the last-drawn glyph at each offset is intact where not overlapped):
    # each image's classes are the classes of the glyphs its pixels show.
    found = 0
    for image, label, corners in zip(images, labels, offsets, strict=True):
        for y, x in corners.tolist():
            window = image[:, y:y + 4, x:x + 4]
            for g in range(64):
                mask = task.mask_gss[g]
                if torch.allclose(window[:, mask], task.colour_g3[g][:, None].expand(3, int(mask.sum()))):
                    assert label[task.class_of_glyph[g]] == 1.0
                    found += 1
                    break
    assert found > 250  # most of the 300 glyphs are intact (some are drawn over by a later one at the same corner)
    with pytest.raises(ValueError, match="must divide"):
        GlyphTask(num_glyphs=64, num_classes=10)
