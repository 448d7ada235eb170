"""What the model card reports about an image encoder: the library's parameter counts and counted FLOPs per image.

Definitions and the implementation: `mmsoftmoe.models.accounting` (shared with the benchmarks).
"""

from __future__ import annotations

from mmsoftmoe.models.accounting import image_flops as count_flops
from mmsoftmoe.models.accounting import parameter_counts

__all__ = ["count_flops", "parameter_counts"]
