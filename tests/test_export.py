"""Image encoder export: each format loaded the way a user would load it equals the eager mmsoftmoe model.

One micro checkpoint (perturbed weights, so zero-init biases cannot hide a bug) is exported to every format
once; the tests load each folder with the format's own library (timm, open_clip, transformers, onnxruntime,
torch.export), on a batch the exporter never saw, and compare with `load_clip(checkpoint)`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import timm
import torch
from PIL import Image
from transformers import AutoModel

from mmsoftmoe.export import FORMATS, export_checkpoint
from mmsoftmoe.export.formats import parse_formats
from mmsoftmoe.models.clip import build_clip, load_clip, resolve_clip_config, save_clip

MODEL = "SoftMoE-Micro-4-32"
EMBED_DIM = 64
TRAINER_STATE = {"step": 1234, "samples_seen": 78976, "config": {"dataset": "synthetic-shapes", "lr": 5e-4},
                 "metrics": {"zeroshot/acc1": 0.4375, "retrieval/image_retrieval_recall@1": 0.25}}


def write_checkpoint(folder: Path, model_name: str = MODEL, seed: int = 0) -> Path:
    """A checkpoint as the training loop writes it: open_clip folder + trainer_state.json, perturbed weights."""
    torch.manual_seed(seed)
    model, _ = build_clip(model_name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_clip(model, resolve_clip_config(model_name), folder)
    (folder / "trainer_state.json").write_text(json.dumps(TRAINER_STATE))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_1234")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exports") / "micro"
    return out, export_checkpoint(checkpoint, "all", out)


@pytest.fixture(scope="module")
def eager(checkpoint):
    model, tokenizer, _ = load_clip(checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def load_timm(folder: Path) -> torch.nn.Module:
    """The issue's call: the architecture name plus the exported file (num_classes in the overlay keeps the head)."""
    config = json.loads((folder / "config.json").read_text())
    n = config["num_classes"]
    return timm.create_model(config["architecture"], pretrained=True, num_classes=n,
                             pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=n)).eval()


def load_open_clip(folder: Path):
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval().encode_image


def load_hf(folder: Path):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    return lambda x: model(pixel_values=x).image_embeds


def load_onnx(folder: Path):
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["image_embeds"], {"pixel_values": x.numpy()})[0])


def load_pt2(folder: Path):
    return torch.export.load(folder / "model.pt2").module()


USER_LOADERS = {"timm": load_timm, "open_clip": load_open_clip, "hf": load_hf, "onnx": load_onnx,
                "torch_export": load_pt2}
TOLERANCE = {"timm": 1e-5, "open_clip": 1e-5, "hf": 1e-5, "onnx": 1e-4, "torch_export": 1e-5}


def test_every_format_has_a_user_loader():
    assert set(USER_LOADERS) == set(FORMATS) == set(TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(USER_LOADERS))
@torch.no_grad()
def test_export_matches_eager_model_at_any_batch_size(name, exported, eager, pixels):
    out, _ = exported
    encoder = USER_LOADERS[name](out / name)
    expected = eager[0].encode_image(pixels)
    tol = TOLERANCE[name]
    batched = encoder(pixels)
    assert batched.shape == (8, EMBED_DIM)
    assert (batched - expected).abs().max().item() <= tol
    for i in (0, 5):  # per-example determinism: an image alone gives what it gives inside the batch
        assert (encoder(pixels[i : i + 1]) - batched[i : i + 1]).abs().max().item() <= tol
    assert (encoder(pixels[:3]) - expected[:3]).abs().max().item() <= tol  # a batch size never traced


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
def test_exporter_records_its_own_parity_time_and_size(name, exported):
    out, reports = exported
    report = json.loads((out / name / "export_report.json").read_text())
    assert report == json.loads(json.dumps(reports[name]))
    parity = report["parity"]
    assert parity["batch_size"] == 8 and parity["tolerance"] == TOLERANCE[name]
    for key in ("max_abs_diff", "batch1_max_abs_diff", "batch1_vs_batch_max_abs_diff"):
        assert 0 <= parity[key] <= TOLERANCE[name]
    files = sum(p.stat().st_size for p in (out / name).iterdir() if p.name not in ("README.md", "export_report.json"))
    assert report["size_bytes"] == files > 0
    assert report["export_seconds"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.slow
def test_timm_folder_head_is_the_projection_with_zero_bias(exported, eager):
    out, _ = exported
    config = json.loads((out / "timm" / "config.json").read_text())
    assert config["architecture"] == "softmoe_vit_micro_patch4_32_e16"
    assert config["num_classes"] == EMBED_DIM and config["num_features"] == 64
    assert config["pretrained_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)  # the CLIP preprocessing
    model = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True)
    assert torch.equal(model.head.weight, eager[0].visual.head.proj.weight)
    assert torch.count_nonzero(model.head.bias) == 0


@pytest.mark.slow
@torch.no_grad()
def test_open_clip_folder_is_the_whole_clip_model(exported, eager, checkpoint):
    folder = exported[0] / "open_clip"
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    texts = ["a red square", "a blue circle on grey"]
    expected_text = eager[0].encode_text(eager[1](texts))
    assert torch.allclose(model.eval().encode_text(tokenizer(texts)), expected_text, atol=1e-5, rtol=0)
    loaded, _, config = load_clip(folder)  # what `mmsoftmoe eval` loads
    assert config["model_cfg"] == json.loads((checkpoint / "open_clip_config.json").read_text())["model_cfg"]
    reference = eager[0].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


@pytest.mark.slow
@torch.no_grad()
def test_hf_folder_is_remote_code_returning_embeddings_and_patch_tokens(exported, eager, pixels):
    folder = exported[0] / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mmsoftmoe.MMSoftMoEVisionConfig",
                                  "AutoModel": "modeling_mmsoftmoe.MMSoftMoEVisionModel"}
    for name in ("configuration_mmsoftmoe.py", "modeling_mmsoftmoe.py"):  # vendored: runs without mmsoftmoe
        tree = ast.parse((folder / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not [m for m in imported if m.split(".")[0] == "mmsoftmoe"]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    out = model(pixel_values=pixels, output_patch_tokens=True)
    trunk = eager[0].visual.trunk
    assert torch.allclose(out.last_hidden_state, trunk.forward_features(pixels), atol=1e-5, rtol=0)
    assert torch.allclose(out.pooler_output, trunk(pixels), atol=1e-5, rtol=0)
    assert model(pixel_values=pixels).last_hidden_state is None


@pytest.mark.slow
def test_onnx_batch_dimension_is_symbolic(exported):
    session = ort.InferenceSession(str(exported[0] / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.shape == ["batch", 3, 32, 32] and outp.shape == ["batch", EMBED_DIM]
    for b in (1, 2, 13):
        (y,) = session.run(None, {inp.name: np.zeros((b, 3, 32, 32), np.float32)})
        assert y.shape == (b, EMBED_DIM)


def analytic_flops(d: int, m: int, depth: int, h: int, moe_blocks: int, slots: int, patch_in: int, e: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of the micro ViT by hand: attention, MLPs, Soft MoE, patchify, proj."""
    attention = 2 * m * d * 3 * d + 2 * m * d * d + 2 * 2 * m * m * d
    mlp = 2 * 2 * m * d * h
    soft_moe = 3 * 2 * m * d * slots + slots * 2 * 2 * d * h  # logits, dispatch, combine; experts on the slots
    return depth * attention + (depth - moe_blocks) * mlp + moe_blocks * soft_moe + 2 * m * patch_in * d + 2 * d * e


@pytest.mark.slow
def test_model_card_counts_and_training_facts(exported):
    out, reports = exported
    report = reports["onnx"]
    assert report["flops_per_image"] == analytic_flops(d=64, m=64, depth=4, h=256, moe_blocks=2, slots=16,
                                                       patch_in=3 * 4 * 4, e=EMBED_DIM)
    params = report["parameters"]
    model, _ = build_clip(MODEL)
    assert params["total"] == sum(p.numel() for p in model.visual.parameters()) == params["used_per_image"]
    per_layer = 16 * (2 * 64 * 256 + 256 + 64)
    assert params["expert"] == 2 * per_layer
    assert params["flop_equivalent_active"] == round(params["total"] - 2 * per_layer + 2 * per_layer * 1 / 64)
    for name in FORMATS:
        card = (out / name / "README.md").read_text()
        for fact in ("softmoe_vit_micro_patch4_32_e16", f"{params['total']:,}", f"{report['flops_per_image']:,}",
                     "FLOP-equivalent active parameters", "| steps | 1234 |", "synthetic-shapes", "zeroshot/acc1",
                     "0.4375", "## How to load", str(out / name), "max abs diff vs eager"):
            assert fact in card, (name, fact)
    assert "torch.export" in (out / "torch_export" / "README.md").read_text()
    assert "dynamo=True" in (out / "onnx" / "README.md").read_text()


def test_parse_formats():
    assert parse_formats("timm, onnx,timm") == ["timm", "onnx"]
    assert parse_formats("all") == list(FORMATS)
    assert parse_formats(["torchscript"]) == ["torch_export"]
    with pytest.raises(ValueError, match="unsupported export format 'tflite'"):
        parse_formats("timm,tflite")


HF_WITHOUT_MMSOFTMOE = """
import sys
sys.modules["mmsoftmoe"] = None  # any import of mmsoftmoe now fails
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model.get_image_features(torch.load(sys.argv[2])), sys.argv[3])
"""


@pytest.mark.slow
def test_hf_folder_runs_without_mmsoftmoe(exported, eager, pixels, tmp_path):
    """A fresh process where mmsoftmoe cannot be imported (fresh remote-code cache too) loads and runs it."""
    torch.save(pixels, tmp_path / "pixels.pt")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", HF_WITHOUT_MMSOFTMOE, str(exported[0] / "hf"), str(tmp_path / "pixels.pt"),
                    str(tmp_path / "embeds.pt")], check=True, env=env, cwd=tmp_path, capture_output=True)
    with torch.no_grad():
        expected = eager[0].encode_image(pixels)
    assert (torch.load(tmp_path / "embeds.pt") - expected).abs().max().item() <= 1e-5


# What each card's snippet leaves behind: (the name of its image embeddings, of the pixels they were computed from).
SNIPPET_OUTPUT = {"timm": ("features", "pixels"), "open_clip": ("image_features", None), "hf": ("out", "pixels"),
                  "onnx": ("embeds", "pixels"), "torch_export": ("embeds", "pixels")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
def test_model_card_snippet_computes_the_eager_embeddings(name, exported, eager, pixels):
    """The card's "How to load" code, run with `pixels` (numpy for onnxruntime) and a PIL `image`, gives the eager
    model's image embeddings of the same input (for open_clip: of the image through the checkpoint's own eval
    transform, built here without the export)."""
    from mmsoftmoe.data import transforms_from_preprocess_cfg
    from mmsoftmoe.models.clip import preprocess_config

    card = (exported[0] / name / "README.md").read_text()
    code = card.split("## How to load", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    namespace = {"pixels": pixels.numpy() if name == "onnx" else pixels, "image": image}
    with torch.no_grad():
        exec(compile(code, f"{name}/README.md", "exec"), namespace)
        output, inputs = SNIPPET_OUTPUT[name]
        got = namespace[output].image_embeds if name == "hf" else torch.as_tensor(namespace[output])
        # hf's snippet replaces `pixels` by its image processor's output: the input the embeddings came from.
        x = torch.as_tensor(namespace[inputs]) if inputs else transforms_from_preprocess_cfg(
            preprocess_config(eager[0]))[1](image)[None]
        expected = eager[0].encode_image(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE[name]


@pytest.mark.slow
def test_hf_image_processor_matches_the_open_clip_eval_transform(exported, eager):
    """AutoImageProcessor from the hf export prepares images like the checkpoint's own eval transform: exactly
    (rescale, mean, std, size) for an image at the model's size; within resampling differences (the two libraries
    round crop offsets differently) for a smooth image that needs resizing."""
    from transformers import AutoImageProcessor

    from mmsoftmoe.data import transforms_from_preprocess_cfg
    from mmsoftmoe.models.clip import preprocess_config

    processor = AutoImageProcessor.from_pretrained(exported[0] / "hf")
    _, eval_tf = transforms_from_preprocess_cfg(preprocess_config(eager[0]))
    rng = np.random.default_rng(0)
    exact = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.testing.assert_close(processor(exact, return_tensors="pt").pixel_values[0], eval_tf(exact),
                               atol=1e-5, rtol=0)
    ramp = np.linspace(0, 255, 90)[:, None, None] * np.ones((90, 61, 3)) * np.array([1.0, 0.6, 0.3])
    smooth = Image.fromarray(ramp.astype(np.uint8))
    theirs, ours = processor(smooth, return_tensors="pt").pixel_values[0], eval_tf(smooth)
    assert theirs.shape == ours.shape and (theirs - ours).abs().mean() < 0.1


def markdown_tables(text: str) -> list[list[str]]:
    """The rows of each Markdown table in `text` (a table: consecutive lines starting with `|`)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def columns(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip())) - 2  # the pipes that are not escaped, less the outer two


def test_model_card_tables_keep_their_shape(exported):
    """Every row of every card table has the header's columns: no multi-line repr or bare pipe breaks a row."""
    out, _ = exported
    for name in FORMATS:
        card = (out / name / "README.md").read_text()
        tables = markdown_tables(card)
        assert len(tables) >= 4, name
        for rows in tables:
            assert rows[1].startswith("|---"), (name, rows[:2])
            assert {columns(row) for row in rows} == {columns(rows[0])}, (name, rows)
        assert "| MoE layer / blocks | soft / [2, 3] |" in card, name
