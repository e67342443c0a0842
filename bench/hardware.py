"""Per-GPU ceilings and the efficiency model's parameters.

Ceilings are dense datasheet rates (REFERENCE.md section 4; NVIDIA H100/H200/B200 datasheets,
the RTX Blackwell GPU architecture whitepaper), never fitted. The efficiency model has five
parameters per GPU, the same for every row (model, resolution, precision) of that GPU:

``mm_eff``       fraction of the tensor-core peak that a large 16-bit GEMM / convolution
                 reaches. 0.80 = 790 / 989 TFLOP/s, an 8192^3 bf16 matmul measured on this
                 project's H200 (KINDS.md, 2026-10-28 and 11-04); assumed for the other GPUs.
``lowbit_eff``   the same for the 4-bit W4A4 GEMM relative to its own peak (INT8 on Hopper,
                 FP4 on Blackwell). Hopper: 0.50, an assumption: INT4 is unpacked to INT8 in
                 registers and the int32 accumulator is rescaled every 64-element group in
                 software (DeepGEMM reports up to ~1550 of 1979 TFLOP/s, 0.78, for FP8 with
                 128-element block scales; 64-element groups rescale twice as often).
                 Blackwell: 0.70, block scales are applied by the MMA itself. To be replaced by
                 the kernel microbenchmarks' measurements.
``attn_eff``     fraction of the 16-bit attention peak that the attention kernel reaches at head
                 dim 128 and long sequences. The least-known parameter: the paper does not say
                 which kernel its base runs used. Public H100 figures: FlashAttention-2 ~350
                 TFLOP/s (0.35, REFERENCE.md sec. 4), Triton's flash tutorial 459-477 (0.47,
                 pytorch/benchmark PR 2391), FA3 FP16 ~650 (0.66). Hopper default 0.50: the one
                 value in this file chosen by looking at the paper's numbers. With FLUX's
                 default 28 base steps it puts the predicted base latencies 9-11% above the
                 published ones at 1K, 2K and 4K alike; FA2's 0.35 would put them 20-43% above.
                 It is used unchanged for every row, and for the H200 (same chip).
                 ``bench table --sensitivity`` shows the table for 0.35 / 0.50 / 0.66. B200:
                 0.50, assumed as Hopper. RTX 5090: 0.75 of its fp32-accumulate peak, an
                 assumption (GeForce tensor cores run fp32 accumulation at half rate, which hides
                 the softmax work that holds FA2 to ~35% on Hopper), not compared with anything:
                 the paper's 5090 base latency is only implied by its 138x.
``bw_eff``       fraction of the memory bandwidth that memory-bound kernels reach: 0.90 =
                 4.3 / 4.8 TB/s, a device-to-device copy measured on this project's H200.
``dispatch_s``   host time to issue one kernel from eager PyTorch (Python + dispatcher +
                 launch): 10 us, the usual order of magnitude of eager per-op overhead. The GPU
                 waits whenever the host falls behind (the queue model in latency.py), which is
                 what makes small-token steps launch-bound.

These are documented defaults; :func:`get_gpu` accepts overrides and the CLI exposes the most
uncertain ones (``--attn-eff``, ``--base-steps``) so their effect can be shown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["GPU", "GPUS", "get_gpu", "gpu_from_device_name"]

TERA = 1e12


@dataclass(frozen=True)
class GPU:
    """Ceilings (dense FLOP/s, bytes/s) and efficiency parameters of one GPU."""

    name: str
    label: str
    bf16: float  # 16-bit tensor rate with fp32 accumulation
    fp16_acc16: float  # 16-bit tensor rate with fp16 accumulation (GeForce: 2x bf16)
    int8: float
    fp8: float
    fp4: float | None  # None: no FP4 tensor cores
    bandwidth: float  # HBM / GDDR bytes per second
    sms: int  # streaming multiprocessors (wave quantization)
    lowbit_format: str  # the W4A4 format this GPU runs natively: "int4" (via INT8) or "nvfp4"
    mm_eff: float = 0.80
    lowbit_eff: float = 0.50
    attn_eff: float = 0.35
    bw_eff: float = 0.90
    dispatch_s: float = 10e-6
    sources: str = ""

    @property
    def lowbit_peak(self) -> float:
        """Peak rate of the W4A4 GEMM: FP4 where the GPU has it, else INT8 (INT4 unpacked)."""
        return self.fp4 if self.lowbit_format == "nvfp4" and self.fp4 else self.int8

    def params(self) -> dict[str, float]:
        """The efficiency model's parameters (for tables and JSON)."""
        return {
            "mm_eff": self.mm_eff,
            "lowbit_eff": self.lowbit_eff,
            "attn_eff": self.attn_eff,
            "bw_eff": self.bw_eff,
            "dispatch_us": self.dispatch_s * 1e6,
        }

    def ceilings(self) -> dict[str, float | None]:
        """Peaks in TFLOP/s (TB/s for bandwidth)."""
        return {
            "bf16_tflops": self.bf16 / TERA,
            "fp16_acc16_tflops": self.fp16_acc16 / TERA,
            "int8_tops": self.int8 / TERA,
            "fp8_tflops": self.fp8 / TERA,
            "fp4_tflops": self.fp4 / TERA if self.fp4 else None,
            "bandwidth_tbs": self.bandwidth / TERA,
        }


GPUS: dict[str, GPU] = {
    "h100": GPU(
        "h100", "NVIDIA H100 SXM", 989e12, 989e12, 1979e12, 1979e12, None, 3.35e12, 132, "int4",
        attn_eff=0.50, sources="H100 datasheet (dense); REFERENCE.md sec. 4",
    ),
    "h200": GPU(
        "h200", "NVIDIA H200", 989e12, 989e12, 1979e12, 1979e12, None, 4.8e12, 132, "int4",
        attn_eff=0.50, sources="H200 datasheet (H100 rates, 141 GB at 4.8 TB/s); H200.md",
    ),
    "b200": GPU(
        "b200", "NVIDIA B200", 2250e12, 2250e12, 4500e12, 4500e12, 9000e12, 8.0e12, 148, "nvfp4",
        lowbit_eff=0.70, attn_eff=0.50,
        sources="HGX B200 datasheet per GPU (dense); REFERENCE.md sec. 4",
    ),
    "rtx5090": GPU(
        "rtx5090", "NVIDIA GeForce RTX 5090", 209.5e12, 419e12, 838e12, 419e12, 1676e12, 1.792e12,
        170, "nvfp4", lowbit_eff=0.70, attn_eff=0.75,
        sources="RTX Blackwell architecture whitepaper (dense; bf16 at fp32 accumulate)",
    ),
}  # fmt: skip


def get_gpu(name: str, **overrides) -> GPU:
    """The :data:`GPUS` entry ``name`` with parameter ``overrides`` (None values ignored)."""
    key = (name or "").lower().replace(" ", "").replace("-", "")
    if key not in GPUS:
        raise ValueError(f"unknown gpu {name!r}; expected one of {', '.join(GPUS)}")
    fields = {f.name for f in dataclasses.fields(GPU)}
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise ValueError(f"unknown GPU parameter(s) {bad}; expected some of {sorted(fields)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for k, v in overrides.items():
        if k.endswith("_eff") and not 0 < v <= 1:
            raise ValueError(f"{k}={v} must be in (0, 1]")
    return dataclasses.replace(GPUS[key], **overrides)


def gpu_from_device_name(device_name: str) -> str | None:
    """Map ``torch.cuda.get_device_name()`` to a :data:`GPUS` key (None if not modelled)."""
    n = device_name.upper().replace(" ", "")
    for key, token in (("h200", "H200"), ("h100", "H100"), ("b200", "B200"), ("rtx5090", "5090")):
        if token in n:
            return key
    return None
