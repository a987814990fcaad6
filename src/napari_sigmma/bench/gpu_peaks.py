"""Dense BF16 tensor-core peaks of common GPUs, for "achieved FLOP/s as a fraction of peak".

Figures are the vendor's *dense* (no 2:4 sparsity) BF16 tensor-core numbers with FP32
accumulation, from the NVIDIA product datasheets (the datasheets print the sparse figure,
twice these, with an asterisk). Matched by substring of ``torch.cuda.get_device_name()``,
first match wins (so ``A100`` is tested before ``A10`` and ``L40S`` before ``L4``). A
device not in the table gets no table peak; ``bench --gpu --peak-tflops X`` supplies one,
and the bench always also measures a large bf16 matmul as the achievable peak.
"""

from __future__ import annotations

#: (name substring, dense BF16 TFLOP/s, source)
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200", 989.4, "NVIDIA H200 datasheet (SXM: 1,979 TFLOPS BF16 with sparsity)"),
    ("GH200", 989.4, "NVIDIA GH200 datasheet (1,979 TFLOPS BF16 with sparsity)"),
    ("H100 NVL", 835.5, "NVIDIA H100 datasheet (NVL: 1,671 TFLOPS BF16 with sparsity)"),
    ("H100 PCIe", 756.5, "NVIDIA H100 datasheet (PCIe: 1,513 TFLOPS BF16 with sparsity)"),
    ("H100", 989.4, "NVIDIA H100 datasheet (SXM: 1,979 TFLOPS BF16 with sparsity)"),
    ("A100", 312.0, "NVIDIA A100 datasheet (312 TFLOPS BF16 dense, 624 with sparsity)"),
    ("L40S", 362.05, "NVIDIA L40S datasheet (362.05 TFLOPS BF16 dense, 733 with sparsity)"),
    ("L40", 181.05, "NVIDIA L40 datasheet (181.05 TFLOPS BF16 dense, 362.1 with sparsity)"),
    ("L4", 121.0, "NVIDIA L4 datasheet (242 TFLOPS BF16 with sparsity)"),
    ("A10", 125.0, "NVIDIA A10 datasheet (125 TFLOPS BF16 dense, 250 with sparsity)"),
)


def table_peak(device_name: str) -> tuple[float | None, str]:
    """``(TFLOP/s, source)`` of the first table entry whose name is in ``device_name``."""
    for key, tflops, source in PEAK_BF16_TFLOPS:
        if key.lower() in str(device_name).lower():
            return tflops, f"table: {source}"
    return None, f"no table entry for {device_name!r}"
