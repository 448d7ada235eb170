"""The evaluator protocol: a newly registered evaluator runs through ``run_evaluation`` and reaches the demo's table
with no other edit, gets the shared features it declares, and is skipped on data it cannot use."""

from typing import Any

import open_clip
import pytest
import torch

from mmsoftmoe.models.clip import build_clip, preprocess_config
from mmsoftmoe_eval.datasets import DigitsDataset
from mmsoftmoe_eval.main import TASKS, run_evaluation
from mmsoftmoe_eval.protocol import EVALUATORS, Evaluator, TaskInputs, register
from mmsoftmoe_training.demo import results_table


class MeanNorm(Evaluator):
    """A toy evaluator: the mean L2 norm of the test embeddings."""

    name, task = "meannorm", "mean_norm"
    needs = frozenset({"labels", "test_features"})

    def run(self, inputs: TaskInputs) -> dict[str, Any]:
        return {"norm": inputs.test.embeddings.norm(dim=-1).mean().item(), "images": len(inputs.test.labels)}

    def rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        return [("mean embedding norm", f"{metrics['norm']:.4f}")]

    def columns(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {"mean norm": metrics["norm"]}


@pytest.fixture
def registered():
    register(MeanNorm)
    yield
    del EVALUATORS["meannorm"]


def test_a_registered_evaluator_runs_and_reaches_the_demo_table(registered):
    torch.manual_seed(0)
    model, tokenizer = build_clip("SoftMoE-Micro-4-32")
    cfg = preprocess_config(model)
    transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"])
    results = run_evaluation(model.eval(), tokenizer, dataset=["digits", "pairs:/nowhere"], tasks="meannorm",
                             preprocess=transform)
    assert set(results["pairs:/nowhere"]) == {"seconds", "num_samples"}  # no labels: skipped before reading
    assert results["pairs:/nowhere"]["num_samples"] == {}
    dataset = DigitsDataset("test", transform)
    with torch.inference_mode():
        embeddings = model.encode_image(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    assert results["digits"]["meannorm"]["images"] == len(dataset)
    assert results["digits"]["meannorm"]["norm"] == pytest.approx(embeddings.norm(dim=-1).mean().item(), rel=1e-5)
    train = {"samples_per_s": 1.0, "steps": 1, "first_loss": 1.0, "last_loss": 0.5}
    table = results_table(train, {"digits": results["digits"]}, {}, {})
    row = next(line for line in table.splitlines() if "mean embedding norm" in line)
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "digits", "mean embedding norm", f"{results['digits']['meannorm']['norm']:.4f}"]


def test_builtin_registry_order_and_needs():
    assert TASKS == ("zeroshot", "retrieval", "fewshot", "linprobe", "finetune")
    known = {"labels", "captions", "test_features", "train_features"}
    assert all(EVALUATORS[task].needs <= known for task in TASKS)
    assert {EVALUATORS[task].task for task in ("zeroshot", "retrieval", "linprobe")} == {
        "zeroshot_classification", "zeroshot_retrieval", "linear_probe"}
