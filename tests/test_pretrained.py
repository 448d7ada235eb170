"""Warm starts (`model.pretrained`, per tower) and upcycling (`model.upcycle_from`) through the trainer's builder."""

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

import mmsoftmoe_training.main as train_main
from mmsoftmoe.checkpoint import read_clip_weights
from mmsoftmoe.models.clip import build_clip
from mmsoftmoe.models.pretrained import warm_start_
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.model import build_model

RUN = ["eval.dataset=none", "data.num_workers=0", "batch_size=8", "trackers=[]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    train_main.fit(load_config("smoke", [f"output_dir={out}", *RUN, "steps=2", "checkpoint_every=1"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["final", "checkpoints/step_00000002"])
def test_image_tower_warm_start_loads_only_the_image_tower(trained, folder, tmp_path):
    source = load_file(str(trained / "final" / "open_clip_model.safetensors"))
    cfg = load_config("smoke", [f"output_dir={tmp_path}", *RUN, f"model.pretrained={trained / folder}",
                                "model.pretrained_towers=image"])
    set_seed(cfg.seed)
    model, _, _ = build_model(cfg)
    set_seed(cfg.seed)
    fresh, _, _ = build_model(load_config("smoke", [f"output_dir={tmp_path}", *RUN]))
    fresh_state = fresh.state_dict()
    for name, value in model.state_dict().items():
        expected = source[name] if name.startswith("visual.") else fresh_state[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    assert not torch.equal(source["token_embedding.weight"], model.token_embedding.weight)  # text stayed fresh


@pytest.mark.slow
def test_warm_start_reports_missing_and_unexpected_and_refuses_other_shapes(trained):
    model, _ = build_clip("SoftMoE-Micro-4-32")
    state = read_clip_weights(trained / "final")
    state["visual.extra_tensor"] = torch.zeros(1)
    del state["visual.trunk.pos_embed"]
    report = warm_start_(model, state, "image")
    assert report.unexpected == ["visual.extra_tensor"] and len(report.missing) == 1
    mini, _ = build_clip("SoftMoE-Mini-8-64")
    with pytest.raises(ValueError, match="does not fit this architecture"):
        warm_start_(mini, read_clip_weights(trained / "final"), "both")


def test_upcycle_from_a_dense_clip_file_through_the_config(tmp_path):
    dense, _ = build_clip("Dense-Micro-4-32")
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    cfg = load_config("smoke", [f"output_dir={tmp_path / 'run'}", *RUN, f"model.upcycle_from={path}"])
    model, _, _ = build_model(cfg)
    trunk = model.visual.trunk
    assert torch.equal(trunk.blocks[0].attn.qkv.weight, dense.visual.trunk.blocks[0].attn.qkv.weight)
    assert torch.equal(trunk.blocks[2].mlp.experts.w2[7], dense.visual.trunk.blocks[2].mlp.fc2.weight.t())
