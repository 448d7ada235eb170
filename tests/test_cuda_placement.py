"""CUDA placement without a GPU: every shipped model's forward pass and loss on fake CUDA tensors.

Inside `FakeTensorMode` a model built on the meta device and moved with `to_empty(device="cuda")` runs with
tensors that carry a device and a shape but no memory, so the L/16 and H/14 models run too. Device propagation is
checked as on a GPU: an op mixing a CUDA tensor with a (non-scalar) CPU tensor made inside forward fails, and so
does an op without a CUDA kernel. CUDA autograd and autocast need a real device, so backward is not checked here.
"""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mmsoftmoe.models.clip import build_clip, list_clip_models
from mmsoftmoe_training.loop import build_loss, loss_terms


def fake_cuda_forward_and_loss(model: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                               loss: nn.Module) -> dict[str, torch.Tensor]:
    """Forward and loss of `model` (built on the meta device) on fake CUDA tensors; the outputs, still fake."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cuda")
        out = model(images.to("cuda"), texts.to("cuda"))
        return out | loss_terms(loss, out, None)


@pytest.mark.parametrize("name", list_clip_models())
def test_forward_and_loss_stay_on_cuda(name):
    model, tokenizer = build_clip(name, device="meta")
    side = model.visual.trunk.patch_embed.img_size
    images, texts = torch.zeros(2, 3, *side), tokenizer(["a photo of a cat", "a photo of a dog"])
    loss = build_loss("siglip" if model.logit_bias is not None else "clip", local_loss=False,
                      gather_with_grad=False, rank=0, world_size=1)
    out = fake_cuda_forward_and_loss(model.train(), images, texts, loss)
    assert {k: v.device.type for k, v in out.items()} == dict.fromkeys(out, "cuda")
    assert out["image_features"].shape == out["text_features"].shape == (2, model.text_projection.shape[1])
    assert out["contrastive_loss"].shape == ()


class PlantsACpuTensor(nn.Module):
    """A forward that creates a tensor without a device: on a GPU it lands on the CPU and the add fails."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + torch.zeros(3)


def test_a_cpu_tensor_made_inside_forward_fails():
    with torch.device("meta"):
        model = PlantsACpuTensor()
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match="two devices, cuda:0 and cpu"):
        model.to_empty(device="cuda")
        model(torch.zeros(2, 3, device="cuda"))
