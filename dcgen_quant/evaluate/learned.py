"""Metrics that need a trained network: LPIPS, CLIP score, ImageReward, FID.

Nothing is downloaded. Each metric runs only when its weights are found locally, in
``--metric-weights DIR`` or in the cache its package uses; otherwise it is listed as skipped
with the reason (:func:`load_learned`). Where the files are looked for:

==============  ===========================================================================
LPIPS           ``DIR/lpips/alexnet-owt-7be5be79.pth`` or ``DIR/alexnet-owt-7be5be79.pth``
                (torchvision's ImageNet AlexNet), else torch's hub cache
                ``$TORCH_HOME/hub/checkpoints/`` (where torchvision downloads it); the LPIPS
                linear layers ``DIR/lpips/alex.pth``, else the copy shipped in the installed
                ``torchmetrics`` (or ``lpips``) package. Network: :mod:`.lpips`.
CLIP score      ``DIR/clip/``: a transformers CLIP directory (config, weights, tokenizer,
                preprocessor), else ``openai/clip-vit-large-patch14`` in the Hugging Face
                cache; scored by torchmetrics' ``CLIPScore`` (100 * max(cos, 0)).
ImageReward     ``DIR/image-reward/ImageReward.pt`` + ``med_config.json``, else
                ``~/.cache/ImageReward/``; needs the ``image-reward`` package.
FID             ``DIR/fid/weights-inception-2015-12-05-6726825d.pth``, else torch's hub cache;
                torchmetrics' ``FrechetInceptionDistance`` with torch-fidelity's Inception
                (needs ``torch-fidelity``); over the set, against the reference's images.
==============  ===========================================================================

ImageReward's package and torch-fidelity import torchvision, which does not import next to the
CPU torch this project pins: here they are skipped with that reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_LIN_FILE = "alex.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
CLIP_HUB_NAME = "openai/clip-vit-large-patch14"
METRICS = ("lpips", "clip", "image_reward", "fid")


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _find(weights_dir: Path | None, sub: str, name: str, cache: Path | None) -> Path | None:
    places = []
    if weights_dir is not None:
        places += [weights_dir / sub / name, weights_dir / name]
    if cache is not None:
        places.append(cache / name)
    return next((p for p in places if p.is_file()), None)


def _shipped_lpips_lins() -> Path | None:
    """The LPIPS v0.1 AlexNet linear layers that torchmetrics / lpips ship in their wheels."""
    import importlib.util

    for package, rel in (
        ("torchmetrics", "functional/image/lpips_models/alex.pth"),
        ("lpips", "weights/v0.1/alex.pth"),
    ):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            path = Path(spec.origin).parent / rel
            if path.is_file():
                return path
    return None


def _load_pth(path: Path, what: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a damaged or foreign file
        raise ValueError(f"{what}: {path} is not a readable torch state dict ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _tensor_output(out) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding;
    # torchmetrics 1.9 expects the tensor (Lightning-AI/torchmetrics#3407, fixed after 1.9.0)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _ClipFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors (see :func:`_tensor_output`)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _tensor_output(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _tensor_output(self.model.get_text_features(*args, **kwargs))


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def _signed(pixels: np.ndarray, device) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1]."""
    return (_chw(pixels).float() / 127.5 - 1.0)[None].to(device)


@dataclass
class Learned:
    """The learned metrics that could be set up, and why the others are skipped."""

    lpips: Callable[[np.ndarray, np.ndarray], float] | None = None
    clip: Callable[[np.ndarray, str], float] | None = None
    image_reward: Callable[[np.ndarray, str], float] | None = None
    fid: Callable[[list[np.ndarray], list[np.ndarray]], float] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    """metric -> where its weights came from."""


def lpips_scorer(net, device) -> Callable[[np.ndarray, np.ndarray], float]:
    net = net.to(device)

    def score(ref: np.ndarray, img: np.ndarray) -> float:
        return float(net(_signed(ref, device), _signed(img, device))[0])

    return score


def clip_scorer(load: Callable[[], tuple[Any, Any]], device) -> Callable[[np.ndarray, str], float]:
    """CLIP score of one image and its prompt through torchmetrics' ``CLIPScore``.

    ``load`` returns (transformers CLIPModel, CLIPProcessor).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    def wrapped():
        model, processor = load()
        return _ClipFeatures(model.eval()), processor

    metric = CLIPScore(model_name_or_path=wrapped).to(device)

    def score(img: np.ndarray, prompt: str) -> float:
        metric.reset()
        metric.update(_chw(img)[None].to(device), [prompt])
        return float(metric.compute())

    return score


def fid_scorer(features: nn.Module, device) -> Callable[[list, list], float]:
    """FID between two image sets through torchmetrics' ``FrechetInceptionDistance``.

    ``features`` maps uint8 [N, 3, H, W] to [N, D] (torch-fidelity's Inception, or any network).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features).to(device)

    def score(reference: list[np.ndarray], images: list[np.ndarray]) -> float:
        metric.reset()
        metric.update(torch.stack([_chw(p) for p in reference]).to(device), real=True)
        metric.update(torch.stack([_chw(p) for p in images]).to(device), real=False)
        return float(metric.compute())

    return score


def _setup_lpips(weights_dir, device, out: Learned) -> None:
    from .lpips import LPIPS

    backbone = _find(weights_dir, "lpips", ALEXNET_FILE, torch_hub_checkpoints())
    lins = _find(weights_dir, "lpips", LPIPS_LIN_FILE, None) or _shipped_lpips_lins()
    if backbone is None:
        out.skipped["lpips"] = (
            f"no weights: {ALEXNET_FILE} (torchvision's ImageNet AlexNet) is in neither "
            f"--metric-weights DIR/lpips nor {torch_hub_checkpoints()}"
        )
        return
    if lins is None:
        out.skipped["lpips"] = (
            f"no weights: LPIPS linear layers {LPIPS_LIN_FILE} not in --metric-weights DIR/lpips "
            "and no torchmetrics / lpips package ships them"
        )
        return
    net = LPIPS()
    net.load_weights(_load_pth(backbone, "LPIPS"), _load_pth(lins, "LPIPS"))
    out.lpips = lpips_scorer(net, device)
    out.sources["lpips"] = f"{backbone} + {lins}"


def _setup_clip(weights_dir, device, out: Learned) -> None:
    from transformers import CLIPModel, CLIPProcessor

    local = weights_dir / "clip" if weights_dir is not None else None
    if local is not None and (local / "config.json").is_file():
        path = local
    else:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(CLIP_HUB_NAME, local_files_only=True))
        except Exception:  # huggingface_hub raises its own "not in the cache" errors
            out.skipped["clip"] = (
                f"no weights: no CLIP model in --metric-weights DIR/clip nor {CLIP_HUB_NAME} in "
                "the Hugging Face cache"
            )
            return

    def load():
        return (
            CLIPModel.from_pretrained(path, local_files_only=True),
            CLIPProcessor.from_pretrained(path, local_files_only=True),
        )

    try:
        out.clip = clip_scorer(load, device)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # incomplete / foreign directory
        raise ValueError(f"CLIP weights {path}: cannot load them ({exc})") from None
    out.sources["clip"] = str(path)


def _setup_image_reward(weights_dir, device, out: Learned) -> None:
    cache = Path(os.path.expanduser("~/.cache/ImageReward"))
    ckpt = _find(weights_dir, "image-reward", "ImageReward.pt", cache)
    med = _find(weights_dir, "image-reward", "med_config.json", cache)
    if ckpt is None or med is None:
        out.skipped["image_reward"] = (
            "no weights: ImageReward.pt + med_config.json are in neither --metric-weights "
            f"DIR/image-reward nor {cache}"
        )
        return
    try:
        import ImageReward as reward_package
    except Exception as exc:  # ImportError, or torchvision failing inside its import
        out.skipped["image_reward"] = f"needs the image-reward package ({exc})"
        return
    model = reward_package.load(str(ckpt), device=str(device), med_config=str(med))

    def score(img: np.ndarray, prompt: str) -> float:
        from PIL import Image

        return float(model.score(prompt, Image.fromarray(img)))

    out.image_reward = score
    out.sources["image_reward"] = str(ckpt)


def _setup_fid(weights_dir, device, out: Learned, n_images: int) -> None:
    if n_images < 2:
        out.skipped["fid"] = "needs at least 2 prompts (a covariance over the set)"
        return
    weights = _find(weights_dir, "fid", INCEPTION_FILE, torch_hub_checkpoints())
    if weights is None:
        out.skipped["fid"] = (
            f"no weights: {INCEPTION_FILE} is in neither --metric-weights DIR/fid nor "
            f"{torch_hub_checkpoints()}"
        )
        return
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        features = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"],
            feature_extractor_weights_path=str(weights),
        )  # fmt: skip
    except Exception as exc:  # ModuleNotFoundError when torch-fidelity (or torchvision) is absent
        out.skipped["fid"] = f"needs torch-fidelity ({str(exc).splitlines()[0]})"
        return
    out.fid = fid_scorer(features, device)
    out.sources["fid"] = str(weights)


def load_learned(
    weights_dir: str | Path | None, device, n_images: int, wanted: tuple[str, ...] = METRICS
) -> Learned:
    """Set up every learned metric of ``wanted`` whose weights are found (see the module doc)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else None
    if weights_dir is not None and not weights_dir.is_dir():
        raise NotADirectoryError(f"--metric-weights {weights_dir}: not a directory")
    out = Learned()
    setups = {
        "lpips": lambda: _setup_lpips(weights_dir, device, out),
        "clip": lambda: _setup_clip(weights_dir, device, out),
        "image_reward": lambda: _setup_image_reward(weights_dir, device, out),
        "fid": lambda: _setup_fid(weights_dir, device, out, n_images),
    }
    for name in METRICS:
        if name in wanted:
            setups[name]()
        else:
            out.skipped[name] = "not requested (--metrics)"
    return out
