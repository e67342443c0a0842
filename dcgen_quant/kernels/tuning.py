"""Launch configurations: autotune lists for sm_90 (Hopper) and sm_120 (consumer Blackwell),
their pruning by shared memory and shape, and the fixed configurations used in the interpreter.

Autotune candidates are per architecture family because the two differ in what pays: Hopper has
228 KB of shared memory per SM and warpgroup MMA (wgmma) that wants BLOCK_M >= 64 and 8 warps for
128x256 tiles; sm_120 has about 100 KB of shared memory per block and warp-level mma.sync, so
smaller tiles and fewer stages. Other architectures (sm_80/89, sm_100) use the Hopper list and
rely on the shared-memory pruning.

Pruning removes, before any timing run: configurations whose estimated shared memory exceeds the
device's opt-in limit, and tiles much larger than the problem (BLOCK_M above the next power of
two of M, the same for N), always keeping at least one configuration.

In the interpreter there is no timing to do; fixed large tiles are used instead, because the
interpreter's cost is per operation, not per element (REFERENCE.md section 5).

``DCGEN_QUANT_AUTOTUNE=0`` skips the timing runs on a GPU: each launch takes the first
configuration that survives pruning (quick GPU tests; first calls then compile one
configuration instead of all). :data:`EXERCISE_ARCH` makes the launchers take the GPU path
(autotuner, pruning, heuristics) in the interpreter, so tests can check that wiring on a CPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton


def pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


@functools.cache
def device_limits(index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, max opt-in shared memory in bytes) of CUDA device ``index``."""
    cap = torch.cuda.get_device_capability(index)
    try:
        from triton.runtime import driver

        smem = int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except (AttributeError, KeyError, RuntimeError):
        smem = 101376 if cap[0] == 12 else 232448 if cap[0] >= 9 else 166912
    return cap, smem


def arch_family(device: torch.device) -> str:
    """``"sm_120"`` (consumer Blackwell), ``"sm_100"`` (datacenter Blackwell) or ``"sm_90"``
    (Hopper, and the list every other GPU uses)."""
    cap, _ = device_limits(device.index if device.index is not None else 0)
    return {12: "sm_120", 10: "sm_100"}.get(cap[0], "sm_90")


def configs_for(table: dict, arch: str) -> list:
    """The autotune list of ``arch`` in ``table``, the sm_90 list where it has none."""
    return table.get(arch, table["sm_90"])


EXERCISE_ARCH: str | None = None  # tests only: run the GPU launch path in the interpreter


def autotune_enabled() -> bool:
    """False when ``DCGEN_QUANT_AUTOTUNE=0``."""
    return os.environ.get("DCGEN_QUANT_AUTOTUNE", "1").strip() not in ("0", "false", "no")


def launch_plan(raw, tuned, table, prune, named, device, interpret, interpret_cfg):
    """(kernel, launch kwargs) for one call.

    Parameters
    ----------
    raw : the heuristics-wrapped kernel; tuned : ``arch -> autotuned kernel``
    table : {arch: [Config]}; prune : ``(configs, named_args) -> configs``
    named : the runtime arguments ``prune`` reads (name -> value)
    interpret_cfg : the constexprs used in the interpreter
    """
    if interpret and EXERCISE_ARCH is None:
        return raw, interpret_cfg
    arch = EXERCISE_ARCH or arch_family(device)
    if autotune_enabled():
        return tuned(arch), {}
    c = prune(configs_for(table, arch), named)[0]
    return raw, {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _smem_limit(t: torch.Tensor) -> int:
    if t.device.type != "cuda":  # the interpreter exercising a GPU path: nominal limits
        return 101376 if EXERCISE_ARCH == "sm_120" else 232448
    return device_limits(t.device.index or 0)[1]


def _fit_k(configs, k):
    """Configs whose BLOCK_K does not exceed K (rounded up to a power of two); the ones with the
    smallest BLOCK_K if none does."""
    limit = max(min(c.kwargs["BLOCK_K"] for c in configs), pow2_at_least(k))
    return [c for c in configs if c.kwargs["BLOCK_K"] <= limit]


def _prune(configs, estimate, smem_limit, m, n, bm="BLOCK_M", bn="BLOCK_N"):
    kept = [c for c in configs if estimate(c) <= smem_limit]
    kept = kept or configs[-1:]
    fit = [
        c
        for c in kept
        if c.kwargs.get(bm, 0) <= pow2_at_least(m) and c.kwargs.get(bn, 0) <= pow2_at_least(n, 64)
    ]
    return fit or [min(kept, key=lambda c: c.kwargs.get(bm, 0) * c.kwargs.get(bn, 1))]


def even_tiles(**sizes: str):
    """``triton.heuristics`` setting ``EVEN_X`` = (size argument % ``BLOCK_X`` == 0) for each
    ``X=size argument`` given, e.g. ``even_tiles(M="M", N="N")``: the kernels skip the bounds
    masks of dimensions their tiles divide evenly."""

    def rule(x, size):
        return lambda a: a[size] % a[f"BLOCK_{x}"] == 0

    return triton.heuristics({f"EVEN_{x}": rule(x, size) for x, size in sizes.items()})


def _cfg(num_warps, num_stages, **kwargs):
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------------
# quantize_act (memory bound: a few rows per program, wide K steps)

QUANTIZE_ACT_CONFIGS = {
    "sm_90": [
        _cfg(4, 2, BLOCK_M=16, BLOCK_K=256),
        _cfg(4, 3, BLOCK_M=32, BLOCK_K=128),
        _cfg(8, 2, BLOCK_M=32, BLOCK_K=256),
        _cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
    ],
    "sm_120": [
        _cfg(4, 2, BLOCK_M=16, BLOCK_K=256),
        _cfg(4, 2, BLOCK_M=32, BLOCK_K=128),
        _cfg(4, 3, BLOCK_M=16, BLOCK_K=128),
    ],
}


def prune_quantize_act(configs, named_args, **kwargs):
    m, k = named_args["M"], named_args["K"]
    fit = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= pow2_at_least(m) and c.kwargs["BLOCK_K"] <= pow2_at_least(k, 128)
    ]
    return fit or configs[:1]


def quantize_act_interpret_config(m, k, group) -> dict:
    """Interpreter tiles: up to 128 rows and 512 columns per step (at least two groups)."""
    groups = max(2, min(512 // group, triton.next_power_of_2(k // group)))
    return {"BLOCK_M": min(128, pow2_at_least(m)), "BLOCK_K": group * groups}


# --------------------------------------------------------------------------------------------
# W4A4 GEMMs


GEMM_INT4_CONFIGS = {
    "sm_90": [
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, GROUP_M=8),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=128, GROUP_M=8),
    ],
    "sm_120": [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=64, GROUP_M=8),
    ],
}

GEMM_NVFP4_CONFIGS = {
    "sm_90": [  # the bf16-upcast path
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    ],
    "sm_100": [  # native dot_scaled on tcgen05: BLOCK_M 128, BLOCK_N <= 128 (smaller tiles
        # compile to an emulation or fail with triton 3.6; tests/kernels/test_aot.py checks)
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    ],
    "sm_120": [  # native dot_scaled
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    ],
}


def _gemm_int4_smem(c) -> int:
    bm, bn, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    # packed bytes per stage (32 per row per group) + one unpacked int8 staging of both operands
    return s * (bm + bn) * 32 + (bm + bn) * 64


def _gemm_nvfp4_smem(c, native: bool) -> int:
    bm, bn, bk, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages
    packed = (bm + bn) * bk // 2 + (bm + bn) * bk // 16  # codes + E4M3 scales per stage
    return s * packed + (0 if native else (bm + bn) * bk)  # + bf16 staging of the upcast


def prune_gemm_int4(configs, named_args, **kwargs):
    smem = _smem_limit(named_args["y_ptr"])
    return _prune(configs, _gemm_int4_smem, smem, named_args["M"], named_args["N"])


def prune_gemm_nvfp4(configs, named_args, **kwargs):
    smem = _smem_limit(named_args["y_ptr"])
    k = named_args["K"]
    native = bool(named_args.get("NATIVE", kwargs.get("NATIVE", False)))
    return _prune(_fit_k(configs, k), lambda c: _gemm_nvfp4_smem(c, native), smem, named_args["M"],
                  named_args["N"])  # fmt: skip


def gemm_interpret_config(m, n, block_k=None) -> dict:
    cfg = {"BLOCK_M": min(128, pow2_at_least(m)), "BLOCK_N": min(256, pow2_at_least(n, 64))}
    cfg["GROUP_M"] = 8
    if block_k is not None:
        cfg["BLOCK_K"] = block_k
    return cfg


# --------------------------------------------------------------------------------------------
# W4A16 GEMM (weight-only layers: small M, so narrow M tiles are in the list)

GEMM_W4A16_CONFIGS = {
    "sm_90": [
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 5, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    ],
    "sm_120": [
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ],
}


def _gemm_w4a16_smem(c) -> int:
    bm, bn, bk, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages
    return s * (bm * bk * 2 + bn * bk // 2) + bn * bk * 2


def prune_gemm_w4a16(configs, named_args, **kwargs):
    smem = _smem_limit(named_args["y_ptr"])
    k = named_args["K"]
    return _prune(_fit_k(configs, k), _gemm_w4a16_smem, smem, named_args["M"], named_args["N"])


# --------------------------------------------------------------------------------------------
# attention

ATTENTION_CONFIGS = {
    "sm_90": [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=16, BLOCK_N=64),
    ],
    "sm_120": [
        _cfg(4, 2, BLOCK_M=128, BLOCK_N=64),
        _cfg(8, 2, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=16, BLOCK_N=64),
    ],
}


def _attention_smem(c, d, elt) -> int:
    bm, bn, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    return bm * d * elt + s * 2 * bn * d * elt + bm * bn * elt


def prune_attention(configs, named_args, **kwargs):
    smem = _smem_limit(named_args["o_ptr"])
    d, elt = named_args["HEAD_DIM"] if "HEAD_DIM" in named_args else kwargs["HEAD_DIM"], 2
    kept = [c for c in configs if _attention_smem(c, d, elt) <= smem] or configs[-1:]
    s_q = named_args["S_q"]
    fit = [c for c in kept if c.kwargs["BLOCK_M"] <= pow2_at_least(s_q)]
    return fit or [min(kept, key=lambda c: c.kwargs["BLOCK_M"])]


def attention_interpret_config(s_q, s_kv) -> dict:
    return {"BLOCK_M": min(128, pow2_at_least(s_q)), "BLOCK_N": min(128, pow2_at_least(s_kv))}
