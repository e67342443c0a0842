"""Peak memory of the quantizer's GPTQ step, in [K, K] float32 copies (the unit of
``quantize/plan.py``'s ``WORK_SQUARE_GPTQ``).

``python -m dcgen_quant.bench.gptq_memory [--k 4096]`` runs the step as ``_quantize_residuals``
does (shrinkage estimate, Hessian, inverse factor, GPTQ of one 128-row member) on 512 random
tokens, in this process, and prints the peak resident memory over the baseline (Linux:
``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Choose K of at least 4096: glibc
returns a freed block to the system at once only above its mmap threshold (at most 32 MiB), so
smaller K overstates the working set.
"""

from __future__ import annotations

import argparse
import warnings


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def measure(k: int, tokens: int = 512, rows: int = 128) -> float:
    """Peak RSS over the baseline of the GPTQ step at ``k`` input features, in [K, K] float32
    copies."""
    import torch

    from dcgen_quant.quantize import gptq as G

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g)
    residual = torch.randn(rows, k, generator=g)
    small = G.hessian(x[:, :128])  # warm-up: library code paths and allocator pools
    G.gptq_quantize(residual[:, :128].contiguous(), small, "int4", torch.bfloat16)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss("VmRSS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer tokens than features: the expected warning
        hinv = G.inverse_factor(G.fitted_hessian(x, None)[0], 0.01)
    G.gptq_quantize(residual, None, "int4", torch.bfloat16, hinv=hinv)
    return (_rss("VmHWM") - base) / (k * k * 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4096], help="input features")
    args = parser.parse_args(argv)
    for k in args.k:
        print(f"K = {k}: GPTQ step peak {measure(k):.2f} [K, K] float32 copies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
