"""Full fine-tuning: it beats a frozen-feature probe of the same untrained tower; the saved classifier reloads to the
same predictions; weights, drop path and router losses reach the model as intended."""

import pytest
import timm
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

import mmsoftmoe  # noqa: F401  (registers the towers in timm)
from mmsoftmoe.data import eval_transform
from mmsoftmoe.layers import RoutingStatsMixin
from mmsoftmoe_eval.datasets import DigitsDataset
from mmsoftmoe_eval.features import eval_mode, extract_features, make_loader
from mmsoftmoe_eval.finetune import (
    EpochShuffle,
    FinetuneConfig,
    SeededSamples,
    _train_step,
    build_classifier,
    finetune,
    load_classifier,
)
from mmsoftmoe_eval.linear_probe import evaluate_linear_probe
from mmsoftmoe_eval.metrics import classification_metrics

TOWER = "softmoe_vit_micro_patch4_32_e16"
TRANSFORM = eval_transform(32, mean=(0.5,) * 3, std=(0.5,) * 3)  # digits: 8x8 upsampled to the tower's 32


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def frozen_probe_accuracy(tower: nn.Module) -> float:
    """Logistic-regression probe (weight decay chosen on val) on the tower's frozen pooled features."""
    encode = lambda x: tower.forward_head(tower.forward_features(x), pre_logits=True)
    with eval_mode(tower):
        train = extract_features(encode, make_loader(DigitsDataset("train", TRANSFORM), 256))
        test = extract_features(encode, make_loader(DigitsDataset("test", TRANSFORM), 256))
    return evaluate_linear_probe(*train, *test)["acc1"]


@pytest.mark.slow
def test_short_finetune_beats_a_frozen_probe_of_the_same_untrained_tower(tmp_path):
    tower = timm.create_model(TOWER)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    probe = frozen_probe_accuracy(tower)
    # Mixup/cutmix off: 1437 tiny images. ~8 epochs of the micro tower: about 30 s on one CPU thread.
    config = FinetuneConfig(epochs=8, batch_size=32, lr=2e-3, layer_decay=0.9, warmup_epochs=0.5, mixup=0.0,
                            cutmix=0.0, drop_path_rate=0.05)
    result = finetune(tower, DigitsDataset("train", TRANSFORM), DigitsDataset("test", TRANSFORM), config=config,
                      out_dir=tmp_path)
    assert result["acc1"] > probe + 0.15, (result, probe)  # seen: 0.87 vs 0.54
    assert result["acc5"] >= result["acc1"] and result["architecture"] == TOWER
    assert all(torch.equal(v, before[k]) for k, v in tower.state_dict().items())  # the caller's tower is untouched


@pytest.mark.slow
def test_saved_classifier_reloads_to_the_reported_accuracy(tmp_path):
    train, test = DigitsDataset("train", TRANSFORM), DigitsDataset("test", TRANSFORM)
    train.images, train.labels = train.images[:128], train.labels[:128]
    test.images, test.labels = test.images[:64], test.labels[:64]
    config = FinetuneConfig(epochs=1, batch_size=32, mixup=0.8, cutmix=1.0, ema_decay=0.9, drop_path_rate=0.1)
    result = finetune(TOWER, train, test, config=config, accelerator=Accelerator(), out_dir=tmp_path)
    assert set(result["online"]) == {"acc1", "acc5", "mean_per_class_recall"}  # EMA on: both weights reported
    model, meta = load_classifier(tmp_path)
    assert meta == {"architecture": TOWER, "num_classes": 10, "classnames": train.classnames}
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.inference_mode():
        logits = model(images)
    expected = classification_metrics(logits, torch.as_tensor(test.labels))
    assert {k: result[k] for k in expected} == pytest.approx(expected, abs=1e-6)


def test_build_classifier_copies_the_tower_and_sets_drop_path():
    tower = timm.create_model(TOWER)
    model, arch = build_classifier(tower, num_classes=7, drop_path_rate=0.3)
    assert arch == TOWER and model.head.out_features == 7
    tower_state = tower.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, tower_state[key]), key
    rates = [block.drop_path2.drop_prob if hasattr(block.drop_path2, "drop_prob") else 0.0 for block in model.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, len(model.blocks)).tolist())  # timm: linear in depth
    with pytest.raises(ValueError, match="differs from timm.create_model"):
        build_classifier(timm.create_model(TOWER, depth=2), num_classes=7)
    with pytest.raises(ValueError, match="not a timm model"):
        build_classifier(nn.Linear(3, 3), num_classes=7)


class _RoutedStub(RoutingStatsMixin, nn.Module):
    """A linear classifier whose forward records an auxiliary loss of 2 * ||w||^2, as a router layer would."""

    def __init__(self) -> None:
        super().__init__()
        self._init_routing_stats()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._record(dict, aux_loss=2.0 * self.linear.weight.pow(2).sum())
        return self.linear(x)


def test_train_step_adds_router_aux_losses():
    model = _RoutedStub()
    images, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = nn.functional.cross_entropy(model(images), labels) + 2.0 * model.linear.weight.pow(2).sum()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = _train_step(model, (images, labels), nn.CrossEntropyLoss(), None, optimizer, Accelerator(), 0.0)
    torch.testing.assert_close(loss, expected.detach())


def test_unreadable_images_are_dropped_from_training_batches():
    from mmsoftmoe_eval.features import UNREADABLE_LABEL
    from mmsoftmoe_eval.finetune import _drop_unreadable

    images = torch.arange(5.0).view(5, 1)
    labels = torch.tensor([0, UNREADABLE_LABEL, 2, 3, 4])
    kept_images, kept_labels = _drop_unreadable(images, labels, even=False)
    assert kept_labels.tolist() == [0, 2, 3, 4] and kept_images.view(-1).tolist() == [0.0, 2.0, 3.0, 4.0]
    _, even_labels = _drop_unreadable(images, torch.tensor([0, UNREADABLE_LABEL, UNREADABLE_LABEL, 3, 4]), even=True)
    assert even_labels.tolist() == [0, 3]


class _Noisy(torch.utils.data.Dataset):
    """Each item is random (as an augmentation is) and labelled by its index."""

    classnames = ["a", "b", "c"]

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(2), index


def test_a_samples_augmentation_depends_on_seed_epoch_and_index_alone():
    """So a fine-tune is the same on any number of processes and workers (each loads other samples, in another
    order): the loader's draws equal direct lookups of (epoch, index), epochs reshuffle and redraw, and the caller's
    random state is left as it was."""
    data = SeededSamples(_Noisy(), seed=5)
    state = torch.get_rng_state()
    direct = {(epoch, i): data[(epoch, i)][0] for epoch in (1, 0) for i in reversed(range(12))}
    assert torch.equal(torch.get_rng_state(), state)
    loader = DataLoader(data, batch_size=4, sampler=EpochShuffle(len(data), seed=5))
    orders = []
    for epoch in range(2):
        order = []
        for images, indices in loader:
            for image, index in zip(images, indices.tolist(), strict=True):
                assert torch.equal(image, direct[(epoch, index)])
                order.append(index)
        orders.append(order)
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(12)) and orders[0] != orders[1]
    assert not torch.equal(direct[(0, 0)], direct[(1, 0)])
    assert [i for _, i in EpochShuffle(12, seed=5)] == orders[0]  # a fresh sampler: the same first epoch


def test_the_new_head_is_drawn_from_the_seed_not_the_global_random_state():
    tower = timm.create_model(TOWER)
    heads = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        heads.append(build_classifier(tower, 7, seed=3)[0].head.weight.detach())
    other = build_classifier(tower, 7, seed=4)[0].head
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], other.weight)
    assert heads[0].std().item() == pytest.approx(0.02, rel=0.2)  # timm: truncated normal 0.02 (at +-2 absolute)
    assert torch.count_nonzero(other.bias) == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"ema_decay": 0.99}, "keeps a whole copy of the model"),
])
def test_a_sharded_finetune_refuses_what_it_cannot_do_before_building(change, message):
    tower = timm.create_model(TOWER)
    data = DigitsDataset("test", TRANSFORM)
    with pytest.raises(ValueError, match=message):
        finetune(tower, data, data, config=FinetuneConfig(**change), meshes=object())
    with pytest.raises(ValueError, match="pass the tower, not a name"):
        finetune(TOWER, data, data, meshes=object())
