"""Evaluation of CLIP-style models the way the Soft MoE paper and CLIP_benchmark do it (docs/design.md, section 5).

Every evaluator gets its features from ``extract_features`` (one inference loop, one disk cache). Zero-shot and
retrieval take the model; the probes take features, so a probe on cached features costs no forward pass::

    key = FeatureCacheKey(cache_dir, model=f"{sha256_file(ckpt)}:image", dataset="digits:224", split="train")
    train = extract_features(model.encode_image, train_loader, device=device, cache=key)
    test = extract_features(model.encode_image, test_loader, device=device, cache=key.with_split("test"))
    fewshot = evaluate_fewshot(*train, *test, shots=(1, 5, 10, 25))
    linprobe = evaluate_linear_probe(*train, *test)

``run_evaluation`` (``eval.runner``, also behind ``mmsoftmoe eval``) runs the evaluators registered in
``eval.protocol.EVALUATORS`` (one protocol: ``Evaluator.run(TaskInputs) -> metrics``) per dataset, with the Soft MoE
dispatch pictures (``eval.plots``); ``run_suite`` (``eval.suite``) runs a list of datasets into one table. Datasets
include CLIP_benchmark's ``wds/`` layout (``eval.wds``), with class names and templates from files (``eval.prompts``).
"""

from mmsoftmoe_eval.datasets import (
    ClassificationDataset,
    DigitsDataset,
    HFClassificationDataset,
    ImageFolderDataset,
    build_dataset,
    digits_split,
    load_hf_split,
)
from mmsoftmoe_eval.features import (
    UNREADABLE_LABEL,
    FeatureCacheKey,
    eval_mode,
    extract_features,
    make_loader,
    sha256_file,
)
from mmsoftmoe_eval.fewshot import DEFAULT_L2_REG, DEFAULT_SHOTS, L2_SWEEP, RidgeProbe, evaluate_fewshot
from mmsoftmoe_eval.finetune import (
    FinetuneConfig,
    build_classifier,
    evaluate_classifier,
    finetune,
    load_classifier,
    save_classifier,
)
from mmsoftmoe_eval.linear_probe import WEIGHT_DECAYS, evaluate_linear_probe, fit_logistic, select_weight_decay
from mmsoftmoe_eval.metrics import classification_metrics
from mmsoftmoe_eval.plots import dispatch_maps, plot_dispatch
from mmsoftmoe_eval.protocol import EVALUATORS, Evaluator, TaskInputs, register
from mmsoftmoe_eval.report import markdown_table, plot_fewshot, write_json, write_report
from mmsoftmoe_eval.retrieval import evaluate_retrieval, retrieval_metrics
from mmsoftmoe_eval.runner import TASKS, run_evaluation
from mmsoftmoe_eval.suite import load_suite, run_suite
from mmsoftmoe_eval.wds import WdsDataset
from mmsoftmoe_eval.zero_shot import evaluate_zero_shot, zero_shot_classifier, zero_shot_metrics

__all__ = [
    "EVALUATORS",
    "Evaluator",
    "TaskInputs",
    "WdsDataset",
    "load_suite",
    "register",
    "run_suite",
    "DEFAULT_L2_REG",
    "DEFAULT_SHOTS",
    "L2_SWEEP",
    "TASKS",
    "UNREADABLE_LABEL",
    "WEIGHT_DECAYS",
    "ClassificationDataset",
    "DigitsDataset",
    "FeatureCacheKey",
    "FinetuneConfig",
    "HFClassificationDataset",
    "ImageFolderDataset",
    "RidgeProbe",
    "build_classifier",
    "build_dataset",
    "classification_metrics",
    "digits_split",
    "dispatch_maps",
    "eval_mode",
    "evaluate_classifier",
    "evaluate_fewshot",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "extract_features",
    "finetune",
    "fit_logistic",
    "load_classifier",
    "load_hf_split",
    "make_loader",
    "markdown_table",
    "plot_dispatch",
    "plot_fewshot",
    "retrieval_metrics",
    "run_evaluation",
    "save_classifier",
    "select_weight_decay",
    "sha256_file",
    "write_json",
    "write_report",
    "zero_shot_classifier",
    "zero_shot_metrics",
]
