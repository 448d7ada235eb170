"""The suite runner: mean ranks against scipy, the suite-wide few-shot l2 against a brute-force choice on features
computed by a plain loop, the aggregate table against the per-dataset results, and suite-file errors."""

import csv
import json

import open_clip
import pytest
import torch
from scipy.stats import rankdata

from mmsoftmoe.data.synthetic import ShapesClassification
from mmsoftmoe.models.clip import build_clip, preprocess_config
from mmsoftmoe_eval.datasets import SHAPES_SPLITS, DigitsDataset
from mmsoftmoe_eval.fewshot import L2_SWEEP, evaluate_fewshot
from mmsoftmoe_eval.suite import load_suite, mean_ranks, run_suite

MODEL = "SoftMoE-Micro-4-32"
SHOTS = (1, 5)


def test_mean_ranks_equal_scipy_average_ranks():
    generator = torch.Generator().manual_seed(0)
    scores = (torch.randint(0, 6, (4, 9), generator=generator) / 5).tolist()  # many ties
    expected = sum(rankdata([-s for s in row], method="average") for row in scores) / len(scores)
    assert mean_ranks(scores) == pytest.approx(expected.tolist())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    clip, tokenizer = build_clip(MODEL)
    cfg = preprocess_config(clip)
    return clip.eval(), tokenizer, open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"],
                                                              std=cfg["std"])


def plain_pre_logits(clip, dataset):
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        features = torch.cat([clip.visual.trunk(images[i:i + 256]) for i in range(0, len(images), 256)])
    return features, torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


@pytest.mark.slow
def test_suite_chooses_l2_by_mean_held_out_rank_and_tabulates(model, tmp_path):
    clip, tokenizer, transform = model
    suite = tmp_path / "suite.yaml"
    suite.write_text("- dataset: digits\n  tasks: [zeroshot, fewshot]\n- dataset: shapes\n  name: toy shapes\n")
    entries = load_suite(suite, default_tasks="fewshot")
    results = run_suite(clip, tokenizer, entries, tmp_path / "out", preprocess=transform, shots=SHOTS, num_seeds=2,
                        batch_size=256)
    features = {
        "digits": [plain_pre_logits(clip, DigitsDataset(split, transform)) for split in ("train", "test")],
        "toy shapes": [plain_pre_logits(clip, ShapesClassification(*SHAPES_SPLITS[split][:1],
                                                                   seed=SHAPES_SPLITS[split][1], transform=transform))
                       for split in ("train", "test")],
    }
    sweeps = {name: evaluate_fewshot(*train, *test, shots=SHOTS, num_seeds=2, l2_reg=L2_SWEEP)
              for name, (train, test) in features.items()}
    summary = json.loads((tmp_path / "out" / "suite.json").read_text())
    for shot in SHOTS:
        ranks = sum(rankdata([-a for a in sweep[f"{shot}shot"]["holdout_acc1_per_l2"]]) for sweep in sweeps.values())
        best = [j for j in range(len(L2_SWEEP)) if ranks[j] == ranks.min()][-1]  # ties: the stronger penalty
        assert summary["fewshot_l2"][f"{shot}shot"]["l2_reg"] == L2_SWEEP[best]
        for name, (train, test) in features.items():
            expected = evaluate_fewshot(*train, *test, shots=(shot,), num_seeds=2, l2_reg={shot: L2_SWEEP[best]})
            assert results[name]["fewshot"][f"{shot}shot"]["acc1"] == pytest.approx(expected[f"{shot}shot"]["acc1"],
                                                                                     abs=1e-9)
            assert results[name]["fewshot"][f"{shot}shot"]["l2_reg"] == [L2_SWEEP[best]] * 2
    with (tmp_path / "out" / "suite.csv").open() as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["dataset", "zero-shot top-1", "1-shot top-1", "5-shot top-1"]
    assert [row[0] for row in rows[1:]] == ["digits", "toy shapes", "mean"]
    assert float(rows[1][1]) == pytest.approx(results["digits"]["zeroshot"]["acc1"]) and rows[2][1] == ""
    assert float(rows[3][1]) == pytest.approx(results["digits"]["zeroshot"]["acc1"])  # mean of the one value
    five = [results[name]["fewshot"]["5shot"]["acc1"] for name in ("digits", "toy shapes")]
    assert float(rows[3][3]) == pytest.approx(sum(five) / 2)
    assert (tmp_path / "out" / "toy_shapes" / "results.json").is_file()
    assert "| mean |" in (tmp_path / "out" / "suite.md").read_text()


@pytest.mark.parametrize(("text", "message"), [
    ("dataset: digits\n", r"a non-empty YAML list of entries"),
    ("- name: x\n", r"entry 0 must be a mapping with 'dataset'"),
    ("- dataset: digits\n  task: zeroshot\n", r"entry 0 must be a mapping with 'dataset' and optionally"),
    ("- dataset: digits\n  tasks: [knn]\n", r"Unknown task\(s\) \['knn'\]"),
    ("- dataset: digits\n- dataset: digits\n", r"entry names \['digits', 'digits'\] repeat"),
    ("- dataset: [digits\n", r"is not valid YAML .*: fix the suite file"),
])
def test_suite_file_errors_name_the_fix(text, message, tmp_path):
    (tmp_path / "suite.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_suite(tmp_path / "suite.yaml", default_tasks="zeroshot")
    with pytest.raises(FileNotFoundError, match="No suite file"):
        load_suite(tmp_path / "missing.yaml", default_tasks="zeroshot")
