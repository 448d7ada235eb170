"""Benchmark scripts: speed, memory and quality of mmsoftmoe against its anchors (JSON + a table each)."""
