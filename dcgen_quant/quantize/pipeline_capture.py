"""Calibration from a real diffusers pipeline whose transformer does not fit the device.

:func:`capture_streamed` records the transformer's inputs at every denoising step of the real
16-bit pipeline, like :func:`dcgen_quant.models.capture_pipeline_calibration`, but

* the text encoders run once per prompt (batch), first, and are then dropped: their outputs are
  cached and handed to the denoising calls (the pipeline's own ``encode_prompt`` call is answered
  from the cache, so every pipeline option keeps its meaning);
* the transformer is the meta-device model of the streaming quantizer with its tensors outside
  the blocks on the device, and each block's weights read from the safetensors files right before
  the block runs and freed right after it (forward hooks), unless the whole transformer fits the
  device, in which case it is loaded once. A 24 GB GPU thus runs FLUX.1-dev (23.8 GB of weights).

With ``batch`` prompts per pipeline call the weights are read ``steps x prompts / batch`` times;
``batch=1`` (default) reproduces ``capture_pipeline_calibration`` bit for bit. Under torchrun the
prompt batches are shared round robin by the ranks and every rank receives all records.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..models.calibration import _detach
from .distributed import SOLO, Dist
from .weights import materialize, module_bytes, release

RECORDS = "calibration.pt"


class _Encoded(Exception):
    """Raised by the patched ``encode_prompt`` of the first pass: the denoising is not needed."""

    def __init__(self, result):
        super().__init__("text encoded")
        self.result = result


def _split(record: dict[str, Any], b: int) -> list[dict[str, Any]]:
    """A record of a call on ``b`` prompts -> one record per prompt: rows ``i`` of tensors with
    ``b`` rows, rows ``(i, b + i)`` of tensors with ``2b`` rows (a classifier-free-guidance
    batch: unconditional rows first), other values shared."""
    if b == 1:
        return [record]

    def pick(value, i):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] in (b, 2 * b):
            rows = [i] if value.shape[0] == b else [i, b + i]
            return value[rows].clone()
        if isinstance(value, dict):
            return {k: pick(v, i) for k, v in value.items()}
        return value

    return [{k: pick(v, i) for k, v in record.items()} for i in range(b)]


def _stream_blocks(model, family, weights, device, dtype) -> list:
    """Forward hooks that load each block before it runs and free it after."""
    handles = []
    for name, block in family.blocks(model):

        def load(module, args, kwargs, prefix=f"{name}."):
            materialize(module, prefix, weights, device, dtype)

        handles.append(block.register_forward_pre_hook(load, with_kwargs=True))
        handles.append(block.register_forward_hook(lambda module, args, out: release(module)))
    return handles


def _fits_device(model, dtype, device) -> bool:
    need = module_bytes(model, dtype)
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return need < 0.6 * free
    from .plan import available_host_memory

    return need < 0.5 * available_host_memory()


def capture_streamed(
    pipe_dir: str | Path,
    source,
    prompts: list[str],
    steps: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    dist: Dist = SOLO,
    state_dir: str | Path | None = None,
    batch: int | None = None,
    resident: bool | None = None,
    **call_kwargs,
) -> list[dict[str, Any]]:
    """Transformer inputs of the pipeline in ``pipe_dir`` at every step, for every prompt.

    Parameters
    ----------
    pipe_dir : a diffusers pipeline directory (``model_index.json``)
    source : the transformer's :class:`~dcgen_quant.quantize.streaming.StreamSource`
    prompts : one pipeline sample each; prompt ``i`` uses the generator seeded ``seed + i``
    steps : ``num_inference_steps``
    dtype, device : the 16-bit dtype and where the pipeline runs
    dist : ranks sharing the prompt batches
    state_dir : where the records are kept for ``--resume`` (``calibration.pt``); reused when it
        holds records of the same prompts, steps, seed and batch
    batch : prompts per pipeline call (default 1)
    resident : load the whole transformer once (True), stream its blocks (False), or decide from
        its size and the free device memory (None)
    call_kwargs : passed to every pipeline call (``output_type`` defaults to "latent")

    Returns
    -------
    list of ``transformer.forward`` keyword dicts (CPU tensors, ``return_dict=False``):
    ``len(prompts) * steps`` of them for a one-call-per-step sampler, prompt-major.
    """
    import diffusers

    from ..models.base import family_for

    batch = batch or 1
    request = {"prompts": list(prompts), "steps": steps, "seed": seed, "batch": batch,
               "dtype": str(dtype), "kwargs": repr(sorted(call_kwargs.items()))}  # fmt: skip
    saved = Path(state_dir) / RECORDS if state_dir is not None else None
    if saved is not None and saved.is_file():
        stored = torch.load(saved, map_location="cpu", weights_only=True)
        if stored.get("request") == request:
            return stored["records"]

    model = source.meta_model()
    family = family_for(model)
    prefixes = tuple(f"{name}." for name, _ in family.blocks(model))
    materialize(model, "", source.weights, device, dtype, skip=prefixes)
    with warnings.catch_warnings():
        # diffusers >= 0.36 renames torch_dtype to dtype (a FutureWarning); >= 0.35 is supported
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                pipe_dir, transformer=model, torch_dtype=dtype, local_files_only=True
            )
        except Exception as exc:  # diffusers, transformers, safetensors: many types for bad files
            lines = str(exc).strip().splitlines()
            raise ValueError(
                f"--model {str(pipe_dir)!r}: cannot load DiffusionPipeline from {pipe_dir}: "
                f"{type(exc).__name__}: {lines[0] if lines else ''}"
            ) from None
    encoders = {n: m for n, m in pipe.components.items()
                if isinstance(m, torch.nn.Module) and n.startswith("text_encoder")}  # fmt: skip
    for module in encoders.values():
        module.to(device)
    call_kwargs.setdefault("output_type", "latent")
    batches = [prompts[s : s + batch] for s in range(0, len(prompts), batch)]
    mine = [j for j in range(len(batches)) if j % dist.world == dist.rank]

    # pass 1: the text encoders, once per prompt batch
    encode = pipe.encode_prompt
    cache: dict[int, Any] = {}

    def first_pass(*args, **kwargs):
        raise _Encoded(_detach(encode(*args, **kwargs)))

    pipe.encode_prompt = first_pass
    with torch.no_grad():
        for j in mine:
            try:
                pipe(prompt=batches[j], num_inference_steps=steps, **call_kwargs)
            except _Encoded as done:
                cache[j] = done.result
    for name in encoders:
        setattr(pipe, name, None)
    del encoders
    gc.collect()

    # pass 2: the denoising loop with the transformer streamed block by block
    if resident is None:
        resident = _fits_device(model, dtype, device)
    handles = []
    if resident:
        for name, block in family.blocks(model):
            materialize(block, f"{name}.", source.weights, device, dtype)
    else:
        handles = _stream_blocks(model, family, source.weights, device, dtype)
    signature_records: list[dict[str, Any]] = []
    import inspect

    signature = inspect.signature(model.forward)

    def record(module, args, kwargs):
        bound = dict(signature.bind(*args, **kwargs).arguments)
        bound["return_dict"] = False
        signature_records.append(_detach(bound))

    handles.append(model.register_forward_pre_hook(record, with_kwargs=True))
    mine_records: dict[int, list[dict[str, Any]]] = {}
    try:
        with torch.no_grad():
            for j in mine:
                pipe.encode_prompt = lambda *a, _j=j, **k: cache[_j]
                first = j * batch
                generators = [
                    torch.Generator().manual_seed(seed + first + i) for i in range(len(batches[j]))
                ]
                signature_records.clear()
                pipe(
                    prompt=batches[j], num_inference_steps=steps,
                    generator=generators if len(generators) > 1 else generators[0],
                    **call_kwargs,
                )  # fmt: skip
                per_prompt: list[list] = [[] for _ in batches[j]]
                for rec in signature_records:
                    for i, part in enumerate(_split(_cpu(rec), len(batches[j]))):
                        per_prompt[i].append(part)
                for i, recs in enumerate(per_prompt):
                    mine_records[first + i] = recs
    finally:
        for h in handles:
            h.remove()
        for _, block in family.blocks(model):
            release(block)
        release(model)
        del pipe, model
        gc.collect()

    gathered: dict[int, list] = {}
    for contribution in dist.all_gather(mine_records):
        gathered.update(contribution)
    records = [r for i in range(len(prompts)) for r in gathered[i]]
    if saved is not None and dist.is_main:
        saved.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(saved) as tmp:
            torch.save({"request": request, "records": records}, tmp)
    return records


def _cpu(value):
    from .calib_cache import to_device

    return to_device(value, "cpu")
