"""The alignment report: per-block feature MSE and held-out flow-matching loss.

Per-block feature MSE (the DC-Gen paper's analysis): the base model runs on the base-AE latents
of some images, the adapted model on the new-AE latents of the same images, both with the same
captions, guidance 1 and the same sigma (default 0: the clean latents, so that no independent
noise enters the two spaces); the image hidden states after the patch embedder ("embed") and
after every block are compared, the two token grids reconciled exactly as in stage 1 (pool: the
base states average-pooled onto the new grid; bilinear: the adapted states upsampled onto the
base grid). MSE = mean over images, tokens and channels.

Flow-matching loss: :func:`dcgen_quant.adapt.flow.heldout_flow_loss` on held-out images, with
fixed sigmas and noise, so numbers of different models compare without sampling noise; its
breakdown (:func:`breakdown_table`) gives the held-out loss at each guidance scale and with the
empty caption, and the loss on training images (is a change generalization or fitting?).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from . import family as fam
from .family import TextBatch
from .stages import reconcile


@torch.no_grad()
def block_states(
    model: nn.Module,
    z: torch.Tensor,
    text: TextBatch,
    p: int,
    sigma: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Image hidden states after the embedder and after each block.

    Parameters
    ----------
    z : float32 [B, C, H, W] latents; text : B rows; p : latent patch size; sigma : the noise
        level passed as timestep (the latents are used as given)

    Returns
    -------
    label -> float32 [B, h*w, D], labels ``embed`` then :func:`family.blocks`' labels.
    """
    states: dict[str, torch.Tensor] = {}
    hooks = []

    def grab(label):
        def hook(module, args, output):
            states[label] = fam.block_image_states(output).detach().float()

        return hook

    emb = fam.embedder(model)
    if fam.family_of(model) == "flux":
        hooks.append(emb.register_forward_hook(grab("embed")))
    else:  # patch_embed.proj is a conv: take the flattened PatchEmbed output instead
        hooks.append(model.patch_embed.register_forward_hook(grab("embed")))
    for label, block in fam.blocks(model):
        hooks.append(block.register_forward_hook(grab(label)))
    b = z.shape[0]
    try:
        fam.forward(model, z, text, torch.full((b,), sigma, device=z.device), None, p)
    finally:
        for h in hooks:
            h.remove()
    return states


class AlignmentProbe:
    """Per-block feature MSE of adapted models against one base model, on fixed images.

    The base model's states are computed once (``base_z``, [N, C_b, H_b, W_b]); every
    :meth:`mse` call runs an adapted model on ``new_z`` ([N, C_n, H_n, W_n]) of the same images.
    """

    def __init__(
        self, base, base_z, text: TextBatch, reconcile_mode="pool", sigma=0.0, batch_size=8
    ):
        self.reconcile_mode, self.sigma, self.batch_size = reconcile_mode, sigma, batch_size
        self.text = text
        self.pb = fam.latent_patch_size(base, base_z.shape[1])
        self.grid_b = fam.token_grid(base_z.shape[-2:], self.pb)
        self.base_states = []
        for i in range(0, base_z.shape[0], batch_size):
            tb = text.select(slice(i, i + batch_size))
            self.base_states.append(
                block_states(base, base_z[i : i + batch_size], tb, self.pb, sigma)
            )
        self.labels = list(self.base_states[0])

    @torch.no_grad()
    def mse(self, model: nn.Module, new_z: torch.Tensor) -> dict[str, float]:
        """label -> feature MSE of ``model`` on ``new_z`` against the base."""
        pn = fam.latent_patch_size(model, new_z.shape[1])
        grid_n = fam.token_grid(new_z.shape[-2:], pn)
        sums = dict.fromkeys(self.labels, 0.0)
        count = dict.fromkeys(self.labels, 0)
        for k, i in enumerate(range(0, new_z.shape[0], self.batch_size)):
            tb = self.text.select(slice(i, i + self.batch_size))
            states = block_states(model, new_z[i : i + self.batch_size], tb, pn, self.sigma)
            for label in self.labels:
                a, b = reconcile(
                    states[label],
                    grid_n,
                    self.base_states[k][label],
                    self.grid_b,
                    self.reconcile_mode,
                )
                sums[label] += float(((a - b) ** 2).sum())
                count[label] += a.numel()
        return {label: sums[label] / count[label] for label in self.labels}


def block_table(mse_by_state: dict[str, dict[str, float]], gain: tuple[str, str] | None):
    """Rows (one per block) and columns for :func:`dcgen_quant.tables.emit`.

    ``gain = (before, after)`` adds a column before / after (the stage-1 reduction factor).
    """
    states = list(mse_by_state)
    labels = list(next(iter(mse_by_state.values())))
    rows = []
    for label in labels:
        row = {"block": label}
        for state in states:
            row[state] = mse_by_state[state][label]
        if gain:
            row["gain"] = mse_by_state[gain[0]][label] / max(mse_by_state[gain[1]][label], 1e-30)
        rows.append(row)
    cols = [("block", "block", None)] + [(s, s, ".4g") for s in states]
    if gain:
        cols.append(("gain", f"{gain[0]}/{gain[1]}", ".1f"))
    return rows, cols


def breakdown_table(breakdown: dict[str, dict[str, float]]):
    """Rows (one per model state) and columns of the flow-loss breakdown for
    :func:`dcgen_quant.tables.emit` (``breakdown`` as :func:`~dcgen_quant.adapt.runner.evaluate`
    returns it): the held-out loss at each guidance scale (guidance-embedding models only), the
    held-out loss with the empty caption, and the loss on training images at w = 1."""
    rows = [{"model": k, **v} for k, v in breakdown.items()]
    scales = [k for k in next(iter(breakdown.values())) if k.startswith("w=")]
    cols = [("model", "model", None)] + [(k, f"held-out {k}", ".4f") for k in scales]
    cols += [("empty", "held-out empty caption", ".4f"), ("train", "train images w=1", ".4f")]
    return rows, cols


def save_plot(path: str | Path, mse_by_state: dict, flow_by_state: dict, title: str) -> Path:
    """PNG: per-block feature MSE per state (log scale) and held-out flow loss per state."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for state, values in mse_by_state.items():
        ax1.plot(list(values), list(values.values()), marker="o", label=state)
    ax1.set_yscale("log")
    ax1.set_ylabel("feature MSE vs base (log)")
    ax1.set_xlabel("hidden states after")
    ax1.set_title("per-block feature MSE")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="x", rotation=45)
    names = list(flow_by_state)
    x = torch.arange(len(names)).float()
    ax2.bar(x - 0.2, [flow_by_state[n]["flow"] for n in names], width=0.4, label="w = 1")
    if any(flow_by_state[n].get("guided") is not None for n in names):
        guided = [flow_by_state[n].get("guided") or 0.0 for n in names]
        ax2.bar(x + 0.2, guided, width=0.4, label="guided (distilled)")
    ax2.set_xticks(x.tolist(), names, rotation=45, ha="right", fontsize=8)
    ax2.set_ylabel("held-out flow-matching loss")
    ax2.set_title("flow-matching loss")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
