#!/usr/bin/env bash
# Download, on a machine with network, the wheels that bench/gpu_check.sh installs on the GPU
# machine (Python 3.12, x86-64, no network; torch 2.11, triton 3.6 and most of our dependencies
# are already there, diffusers is not).
#
# Usage: bash bench/fetch_gpu_wheels.sh [DEST]          (DEST defaults to .whl, git-ignored)
# Then carry DEST with the device call (the device tool's `carry: [".whl"]`).
#
# What is needed, and why (checked against the GPU image's package list, KINDS.md):
#   diffusers==0.42.1       the models (FluxTransformer2DModel, AutoencoderDC, ...); absent there
#   importlib_metadata      a requirement of diffusers; absent there (zipp, its own requirement,
#                           is present)
# Every other requirement of diffusers (filelock, huggingface-hub, numpy, Pillow, regex,
# requests, safetensors) is already installed there. Keep one version of each wheel in DEST:
# two versions of one package stop the whole offline install.
set -euo pipefail

DEST="${1:-.whl}"
DIFFUSERS_VERSION="${DIFFUSERS_VERSION:-0.42.1}"
IMPORTLIB_METADATA_VERSION="${IMPORTLIB_METADATA_VERSION:-8.7.0}"

mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any \
    -d "$DEST" \
    "diffusers==${DIFFUSERS_VERSION}" \
    "importlib_metadata==${IMPORTLIB_METADATA_VERSION}"

echo "wheels in $DEST:"
ls -l "$DEST"
echo "requirements of diffusers (all but importlib_metadata are on the GPU image):"
unzip -p "$DEST"/diffusers-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true
