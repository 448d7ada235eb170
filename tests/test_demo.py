"""`make demo`'s driver at smoke size: train, evaluate, export, and a results table that reports what ran."""

from pathlib import Path

from training import demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_smoke_writes_a_truthful_table(tmp_path):
    assert demo.main(["--config", str(ROOT / "configs/demo.yaml"), "smoke=true", f"output_dir={tmp_path}",
                      "data.num_workers=0", "trackers=[]"]) == 0
    table = (tmp_path / "results.md").read_text()
    for row in ("zero-shot top-1", "10-shot ridge top-1", "image->text / text->image R@1",
                "onnx: max abs diff vs eager", "torch_export: max abs diff vs eager"):
        assert row in table
    for fmt in ("timm", "open_clip", "hf", "onnx", "torch_export"):
        assert (tmp_path / "export" / fmt / "export_report.json").is_file()
    assert (tmp_path / "eval" / "shapes" / "results.json").is_file()
    assert (tmp_path / "training.png").is_file()
