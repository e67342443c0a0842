"""On-disk inputs for the evaluate tests: tiny pipelines and checkpoints, small random metric
networks (LPIPS AlexNet + linear layers, a tiny CLIP), a prompt file."""

from __future__ import annotations

import string

import pytest
import torch


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    from bench.evaluate_margins import write_prompts

    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.txt")


def _built(tmp_path_factory, family):
    from bench.evaluate_margins import build

    with torch.random.fork_rng(devices=[]):
        return build(family, tmp_path_factory.mktemp(f"{family}_built"))


@pytest.fixture(scope="session")
def sana_built(tmp_path_factory):
    """tiny SANA pipeline dir + SVDQuant and RTN checkpoints calibrated on it."""
    return _built(tmp_path_factory, "sana")


@pytest.fixture(scope="session")
def flux_built(tmp_path_factory):
    """tiny FLUX (input embedder / 8) pipeline dir + SVDQuant and RTN checkpoints."""
    return _built(tmp_path_factory, "flux")


def tiny_clip_dir(path):
    """A randomly initialized transformers CLIP (text + vision, 32-dim) with its processor."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    text = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 40, "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=40)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def random_lpips_state(seed: int = 0) -> tuple[dict, dict]:
    """(torchvision-AlexNet-layout backbone state, LPIPS lin state), random, positive lins."""
    from dcgen_quant.evaluate.lpips import LPIPS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LPIPS()
        for k in range(5):  # the published lins are non-negative (a distance); so are these
            w = getattr(net, f"lin{k}").model[1].weight
            w.data.uniform_(0.0, 0.1)
    state = net.state_dict()
    backbone = {k: v.clone() for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # the real file has more; ignored
    lins = {k: v.clone() for k, v in state.items() if k.startswith("lin")}
    return backbone, lins


@pytest.fixture(scope="session")
def metric_weights(tmp_path_factory):
    """--metric-weights DIR with random LPIPS weights and a random tiny CLIP."""
    from dcgen_quant.evaluate.learned import ALEXNET_FILE, LPIPS_LIN_FILE

    root = tmp_path_factory.mktemp("metric_weights")
    backbone, lins = random_lpips_state()
    (root / "lpips").mkdir()
    torch.save(backbone, root / "lpips" / ALEXNET_FILE)
    torch.save(lins, root / "lpips" / LPIPS_LIN_FILE)
    tiny_clip_dir(root / "clip")
    return root
