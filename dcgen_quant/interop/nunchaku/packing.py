"""Nunchaku's GPU-tile layouts: every pack and its inverse, in pure torch.

Nunchaku stores each tensor of a W4A4 (SVDQuant) or AWQ W4A16 linear in the order its CUDA
kernels load it (NUNCHAKU_FORMAT.md section 2). This module converts between those layouts and
plain logical tensors; it knows nothing about checkpoints or layer names.

Notation: ``N`` out_features, ``K`` in_features, ``R`` rank; ``Np = ceil(N/128)*128``,
``Kp = ceil(K/128)*128`` (the W4A4 kernels process 128-wide tiles and do not bound-check them),
``Rp = ceil(R/16)*16``. Every ``pack_*`` pads to those sizes (padding rules of section 2.7: codes
and low-rank zeros; scales, smoothing and bias ones); every ``unpack_*`` takes the logical sizes
and returns exactly the unpadded tensor, so ``unpack(pack(x)) == x`` bit for bit.

W4A4 layouts (``n = n_tile*128 + n_local``):

* ``qweight``: a 16x64 weight sub-tile is the B operand of two ``mma.m16n8k64``; one lane owns
  one 16-byte vector of four little-endian int32 words, each holding 8 consecutive k (k%8 = r
  in bits 4r..4r+3). Word order: ``(n_tile, k_tile64, n%128//16, n%8, k%32//8, n%16//8,
  k%64//32)``. A word holds 8 consecutive codes of one row, which is exactly 4 consecutive bytes
  of our canonical nibble layout (element 2i low nibble of byte i), so packing is a permutation
  of 32-bit words.
* INT4 ``wscales`` and 1-D vectors: within each 128 block, logical ``a*16 + b*8 + c*2 + d`` is
  stored at ``a*16 + c*4 + b*2 + d`` (the m16n8 accumulator columns a lane owns); scales are
  n-tile major: ``((n_tile*G + g)*128 + pi(n_local))``.
* NVFP4 ``wscales``: fp8 bytes ``((n_tile*Kp/64 + k//64)*512 + (r*4 + q)*16 + sp*4 + j)`` for
  ``n_local = sp*32 + q*8 + r`` and group ``g = (k//64)*4 + j``.
* low-rank: each 16x16 tile is the B fragment of two ``mma.m16n8k16``; see
  :func:`pack_lowrank_down`.

AWQ W4A16 (``GEMV_AWQ``, the adaLN modulation linears): unsigned codes with zero point 7,
group 64; ``qweight`` interleaves 4 output rows per 64-input block and packs each 32-input chunk
as 8 int16s holding inputs {j, j+8, j+16, j+24}; scales/zeros are plain transposes padded to a
multiple of 16 groups; adaLN rows are interleaved by chunk and the ``+1`` of ``1 + scale`` is
folded into the bias (:func:`interleave_adanorm`, :func:`fold_adanorm_bias`).
"""

from __future__ import annotations

import torch

TILE_N = 128  # W4A4 output-channel tile (Np multiple)
TILE_K = 128  # W4A4 input tile pair (Kp multiple): the kernel reads its 64-wide K tiles in pairs
RANK_TILE = 16  # low-rank MMA k/n tile (Rp multiple)
INT4_GROUP = 64
NVFP4_GROUP = 16
AWQ_GROUP = 64
AWQ_ZERO_POINT = 7
AWQ_GROUP_PAD = 16  # DeepCompressor's ceil_num_groups for group 64: groups rounded up to 16
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def padded(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return -(-int(size) // multiple) * multiple


def _pad2(t: torch.Tensor, rows: int, cols: int, value: float | int) -> torch.Tensor:
    if tuple(t.shape) == (rows, cols):
        return t.contiguous()
    out = torch.full((rows, cols), value, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _check(t: torch.Tensor, name: str, ndim: int, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {shape}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: dtype must be one of {names}, got {t.dtype}")


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# W4A4 qweight


def pack_qweight_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Canonical nibble-packed codes -> Nunchaku W4A4 ``qweight``.

    Parameters
    ----------
    packed : Tensor [N, K/2], uint8
        Two 4-bit codes per byte, element 2i in the low nibble of byte i (dcgen_quant's
        checkpoint layout; INT4 two's complement or E2M1 codes alike). K must be even.

    Returns
    -------
    Tensor [Np, Kp/2], int8 (four bytes = one little-endian int32 word of 8 codes); padded
    codes are 0.
    """
    _check(packed, "packed", 2, (torch.uint8, torch.int8))
    n, half_k = packed.shape
    np_, kp = padded(n, TILE_N), padded(2 * half_k, TILE_K)
    words = _pad2(packed.view(torch.uint8), np_, kp // 2, 0).view(torch.int32)  # [Np, Kp/8]
    # row n = (nt, np, ns, nl) = (n//128, n%128//16, n%16//8, n%8);
    # word k//8 = (kt, ks, kl) = (k//64, k%64//32, k%32//8)
    words = words.reshape(np_ // 128, 8, 2, 8, kp // 64, 2, 4)
    words = words.permute(0, 4, 1, 3, 6, 2, 5)  # -> (nt, kt, np, nl, kl, ns, ks)
    return words.contiguous().view(torch.int8).reshape(np_, kp // 2)


def unpack_qweight_nibbles(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_qweight_nibbles`.

    Parameters
    ----------
    qweight : Tensor [Np, Kp/2], int8 (or uint8)
    n, k : logical out / in features (``Np = ceil(n/128)*128``, ``Kp = ceil(k/128)*128``; k even)

    Returns
    -------
    Tensor [n, k/2], uint8 in the canonical nibble layout.
    """
    _check(qweight, "qweight", 2, (torch.int8, torch.uint8))
    np_, kp = padded(n, TILE_N), padded(k, TILE_K)
    _check_shape(qweight, "qweight", (np_, kp // 2))
    if k % 2:
        raise ValueError(f"k={k} must be even")
    words = qweight.contiguous().view(torch.int32).reshape(np_ // 128, kp // 64, 8, 8, 4, 2, 2)
    words = words.permute(0, 2, 5, 3, 1, 6, 4)  # -> (nt, np, ns, nl, kt, ks, kl)
    out = words.contiguous().reshape(np_, kp // 8).view(torch.uint8)
    return out[:n, : k // 2].contiguous()


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> Nunchaku W4A4 ``qweight``.

    Parameters
    ----------
    codes : Tensor [N, K], int8 (INT4, -8..7) or uint8 (E2M1 codes 0..15, or raw nibbles); only
        the low 4 bits are stored. K must be even.

    Returns
    -------
    Tensor [Np, Kp/2], int8; see :func:`pack_qweight_nibbles`.
    """
    _check(codes, "codes", 2, (torch.int8, torch.uint8))
    if codes.shape[1] % 2:
        raise ValueError(f"codes: K={codes.shape[1]} must be even")
    nib = codes.view(torch.uint8) & 0x0F
    return pack_qweight_nibbles(nib[:, 0::2] | (nib[:, 1::2] << 4))


def unpack_qweight(qweight: torch.Tensor, n: int, k: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_qweight`.

    Parameters
    ----------
    qweight : Tensor [Np, Kp/2], int8
    n, k : logical out / in features
    signed : True: INT4 codes sign-extended to int8 -8..7; False: raw nibbles uint8 0..15
        (E2M1 codes)

    Returns
    -------
    Tensor [n, k], int8 (signed) or uint8.
    """
    packed = unpack_qweight_nibbles(qweight, n, k)
    nib = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(n, k)
    if not signed:
        return nib
    return ((nib.to(torch.int16) ^ 8) - 8).to(torch.int8)


# --------------------------------------------------------------------------------------------
# INT4 group scales and 1-D vectors (bias, smooth, smooth_orig, wcscales)


def pack_wscales(scales: torch.Tensor, pad_value: float = 1.0) -> torch.Tensor:
    """INT4 per-(channel, 64-group) scales -> Nunchaku ``wscales``.

    Parameters
    ----------
    scales : Tensor [N, G], 16-bit; ``scales[n, g]`` is the scale of output channel n, input
        group g (G = K/64). dcgen_quant checkpoints store the transpose, ``wscales`` [G, N].
    pad_value : value of padded channels and groups (DeepCompressor: 1)

    Returns
    -------
    Tensor [Gp, Np], same dtype, ``Gp = Kp/64`` (even). n-tile major: row g of this 2-D view
    is *not* group g once Np > 128.
    """
    _check(scales, "scales", 2)
    n, g = scales.shape
    return _pack_channels(scales, padded(g, TILE_K // INT4_GROUP), pad_value)


def _pack_channels(t: torch.Tensor, gp: int, pad_value: float) -> torch.Tensor:
    # [N, G] -> [Gp, Np]: n_local = a*16 + b*8 + c*2 + d is stored at a*16 + c*4 + b*2 + d,
    # n-tile major
    np_ = padded(t.shape[0], TILE_N)
    s = _pad2(t, np_, gp, pad_value)
    s = s.reshape(np_ // 128, 8, 2, 4, 2, gp).permute(0, 5, 1, 3, 2, 4)  # (nt, g, a, c, b, d)
    return s.contiguous().reshape(gp, np_)


def _unpack_channels(t: torch.Tensor, n: int, groups: int, gp: int, name: str) -> torch.Tensor:
    np_ = padded(n, TILE_N)
    _check_shape(t, name, (gp, np_))
    s = t.contiguous().reshape(np_ // 128, gp, 8, 4, 2, 2)  # (nt, g, a, c, b, d)
    s = s.permute(0, 2, 4, 3, 5, 1).reshape(np_, gp)  # (nt, a, b, c, d, g)
    return s[:n, :groups].contiguous()


def unpack_wscales(wscales: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_wscales`: [Gp, Np] -> [n, groups] (same dtype)."""
    _check(wscales, "wscales", 2)
    return _unpack_channels(wscales, n, groups, padded(groups, TILE_K // INT4_GROUP), "wscales")


def pack_vector(vector: torch.Tensor, pad_value: float = 1.0) -> torch.Tensor:
    """A per-channel vector (``bias``, ``smooth``, ``smooth_orig``, ``wcscales``) -> Nunchaku order.

    Parameters
    ----------
    vector : Tensor [N], any dtype (16-bit in Nunchaku files)
    pad_value : padded entries; 1 (DeepCompressor's value; ``smooth`` must never be padded with
        0, since padded activations are 0 and 0/0 is NaN)

    Returns
    -------
    Tensor [Np], same dtype, permuted within each 128 block like :func:`pack_wscales`.
    """
    _check(vector, "vector", 1)
    return _pack_channels(vector.reshape(-1, 1), 1, pad_value).reshape(-1)


def unpack_vector(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_vector`: [Np] -> [n]."""
    _check(packed, "vector", 1)
    _check_shape(packed, "vector", (padded(n, TILE_N),))
    return _unpack_channels(packed.reshape(1, -1), n, 1, 1, "vector").reshape(-1)


# --------------------------------------------------------------------------------------------
# NVFP4 fp8 micro-scales


def pack_fp8_wscales(scales: torch.Tensor) -> torch.Tensor:
    """NVFP4 per-(channel, 16-group) E4M3 scales -> Nunchaku ``wscales``.

    Parameters
    ----------
    scales : Tensor [N, G], float8_e4m3fn (G = K/16); 16-bit input is accepted when every value
        is exactly representable in E4M3 (ValueError otherwise).

    Returns
    -------
    Tensor [Kp/16, Np], float8_e4m3fn; padded channels and groups are 1.0. Padding follows the
    kernel (``in_features_pad / 16`` rows, as the C++ ``GEMM_W4A4`` allocates), which differs
    from DeepCompressor's ``pad_scale`` (groups to a multiple of 4 only) when K % 128 == 64.
    """
    _check(scales, "scales", 2)
    if scales.dtype != torch.float8_e4m3fn:
        f8 = scales.to(torch.float8_e4m3fn)
        if not torch.equal(f8.to(scales.dtype), scales):
            raise ValueError("scales: values are not exactly representable in float8_e4m3fn")
        scales = f8
    n, g = scales.shape
    np_, gp = padded(n, TILE_N), padded(g, TILE_K // NVFP4_GROUP)
    one = torch.ones((), dtype=torch.float8_e4m3fn).view(torch.uint8).item()
    s = _pad2(scales.view(torch.uint8), np_, gp, one)
    # n_local = sp*32 + q*8 + r, g = kb*4 + j -> ((nt, kb, r, q, sp, j))
    s = s.reshape(np_ // 128, 4, 4, 8, gp // 4, 4).permute(0, 4, 3, 2, 1, 5)
    return s.contiguous().reshape(gp, np_).view(torch.float8_e4m3fn)


def unpack_fp8_wscales(wscales: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp8_wscales`: [Kp/16, Np] -> [n, groups] float8_e4m3fn."""
    _check(wscales, "wscales", 2, (torch.float8_e4m3fn, torch.uint8))
    np_, gp = padded(n, TILE_N), padded(groups, TILE_K // NVFP4_GROUP)
    _check_shape(wscales, "wscales", (gp, np_))
    s = wscales.contiguous().view(torch.uint8).reshape(np_ // 128, gp // 4, 8, 4, 4, 4)
    s = s.permute(0, 4, 3, 2, 1, 5).reshape(np_, gp)  # (nt, sp, q, r, kb, j)
    return s[:n, :groups].contiguous().view(torch.float8_e4m3fn)


# --------------------------------------------------------------------------------------------
# low-rank branch


def _pack_lowrank(t: torch.Tensor, down: bool) -> torch.Tensor:
    # t is [n-role, k-role] padded: down V [Rp, Kp] (n-role = rank), up U [Np, Rp]
    # (k-role = rank). Element (n, k) of a 16x16 tile: ns=n%16//8, nl=n%8, ks=k%16//8,
    # kl=k%8//2, e=k%2; tile order outer = (k//16 for down, n//16 for up), inner = rank//16.
    a, b = t.shape
    v = t.reshape(a // 16, 2, 8, b // 16, 2, 4, 2)  # (n16, ns, nl, k16, ks, kl, e)
    if down:  # outer = k16, inner = n16 (rank)
        v = v.permute(3, 0, 2, 5, 1, 4, 6)
        return v.contiguous().reshape(b, a)
    v = v.permute(0, 3, 2, 5, 1, 4, 6)  # outer = n16, inner = k16 (rank)
    return v.contiguous().reshape(a, b)


def pack_lowrank_down(down: torch.Tensor) -> torch.Tensor:
    """Low-rank down projection ``V`` -> Nunchaku ``lora_down`` / ``proj_down``.

    Parameters
    ----------
    down : Tensor [R, K], 16-bit; logical ``V`` with ``lora_act = x V^T`` on the *unsmoothed*
        input (dcgen_quant's ``proj_down`` [K, R] is ``V^T``)

    Returns
    -------
    Tensor [Kp, Rp], same dtype, MMA-fragment order; padding zeros.
    """
    _check(down, "down", 2)
    r, k = down.shape
    return _pack_lowrank(_pad2(down, padded(r, RANK_TILE), padded(k, TILE_N), 0), down=True)


def unpack_lowrank_down(packed: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_lowrank_down`: [Kp, Rp] -> ``V`` [r, k]."""
    _check(packed, "lora_down", 2)
    rp, kp = padded(r, RANK_TILE), padded(k, TILE_N)
    _check_shape(packed, "lora_down", (kp, rp))
    # (k16, r16, nl, kl, ns, ks, e)
    v = packed.contiguous().reshape(kp // 16, rp // 16, 8, 4, 2, 2, 2)
    v = v.permute(1, 4, 2, 0, 5, 3, 6).reshape(rp, kp)  # (r16, ns, nl, k16, ks, kl, e)
    return v[:r, :k].contiguous()


def pack_lowrank_up(up: torch.Tensor) -> torch.Tensor:
    """Low-rank up projection ``U`` -> Nunchaku ``lora_up`` / ``proj_up``.

    Parameters
    ----------
    up : Tensor [N, R], 16-bit (dcgen_quant's ``proj_up``, unchanged)

    Returns
    -------
    Tensor [Np, Rp], same dtype, MMA-fragment order; padding zeros.
    """
    _check(up, "up", 2)
    n, r = up.shape
    return _pack_lowrank(_pad2(up, padded(n, TILE_N), padded(r, RANK_TILE), 0), down=False)


def unpack_lowrank_up(packed: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """Inverse of :func:`pack_lowrank_up`: [Np, Rp] -> ``U`` [n, r]."""
    _check(packed, "lora_up", 2)
    np_, rp = padded(n, TILE_N), padded(r, RANK_TILE)
    _check_shape(packed, "lora_up", (np_, rp))
    # (n16, r16, nl, kl, ns, ks, e)
    u = packed.contiguous().reshape(np_ // 16, rp // 16, 8, 4, 2, 2, 2)
    u = u.permute(0, 4, 2, 1, 5, 3, 6).reshape(np_, rp)  # (n16, ns, nl, r16, ks, kl, e)
    return u[:n, :r].contiguous()


# --------------------------------------------------------------------------------------------
# AWQ W4A16 (GEMV_AWQ)


def awq_groups(in_features: int) -> int:
    """Rows of AWQ ``wscales`` / ``wzeros``: K/64 rounded up to a multiple of 16."""
    if in_features % AWQ_GROUP:
        raise ValueError(f"in_features={in_features} must be a multiple of {AWQ_GROUP}")
    return padded(in_features // AWQ_GROUP, AWQ_GROUP_PAD)


def pack_awq_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned AWQ codes -> ``GEMV_AWQ`` ``qweight``.

    Parameters
    ----------
    codes : Tensor [O, I], uint8 (or any integer dtype) in 0..15: ``q = c + zero_point`` of rows
        in *stored* order (adaLN rows already interleaved, :func:`interleave_adanorm`).
        O a multiple of 4, I a multiple of 64. ValueError for codes outside 0..15.

    Returns
    -------
    Tensor [O/4, I/2], int32. Read as little-endian int16 ``[O/4, I]``: element
    ``[R, b*64 + s*16 + e]`` = sum over t of ``q[4R + s, (2b + e//8)*32 + t*8 + e%8] << 4t``.
    """
    _check(codes, "codes", 2)
    o, i = codes.shape
    if o % 4 or i % AWQ_GROUP:
        raise ValueError(f"codes: O={o} must be a multiple of 4 and I={i} of {AWQ_GROUP}")
    low = 0 if codes.dtype == torch.uint8 or not codes.numel() else int(codes.min())
    if codes.numel() and (low < 0 or int(codes.max()) > 15):
        raise ValueError(f"codes: AWQ codes must lie in 0..15, got {low}..{int(codes.max())}")
    q = codes.to(torch.uint8).reshape(o // 4, 4, i // 64, 2, 4, 8)  # (R, s, b, h, t, e')
    q = q.permute(0, 2, 1, 3, 5, 4)  # (R, b, s, h, e', t): one int16 per (R, b, s, h, e')
    lo = q[..., 0] | (q[..., 1] << 4)  # little-endian: byte 0 holds t = 0, 1
    hi = q[..., 2] | (q[..., 3] << 4)
    words = torch.stack((lo, hi), dim=-1).reshape(o // 4, 2 * i)
    return words.view(torch.int32)


def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq_qweight`: int32 [O/4, I/2] -> uint8 codes [O, I] (0..15)."""
    _check(qweight, "qweight", 2, (torch.int32,))
    o4, i2 = qweight.shape
    o, i = o4 * 4, i2 * 2
    if i % AWQ_GROUP:
        raise ValueError(f"qweight: I={i} must be a multiple of {AWQ_GROUP}")
    b = qweight.contiguous().view(torch.uint8).reshape(o4, i // 64, 4, 2, 8, 2)  # (R,b,s,h,e',byte)
    nib = torch.stack((b[..., 0] & 15, b[..., 0] >> 4, b[..., 1] & 15, b[..., 1] >> 4), dim=-1)
    # (R, b, s, h, e', t) -> (R, s, b, h, t, e')
    return nib.permute(0, 2, 1, 3, 5, 4).contiguous().reshape(o, i)


def pack_awq_scales(scales: torch.Tensor) -> torch.Tensor:
    """AWQ group scales [O, G] (16-bit, G = I/64) -> ``wscales`` [G', O], G' = G rounded up to
    16 (:func:`awq_groups`); plain transpose, padded groups 0."""
    _check(scales, "scales", 2)
    o, g = scales.shape
    return _pad2(scales.t(), padded(g, AWQ_GROUP_PAD), o, 0)


def unpack_awq_scales(wscales: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_awq_scales`: [G', O] -> [O, groups]."""
    _check(wscales, "wscales", 2)
    if wscales.shape[0] != padded(groups, AWQ_GROUP_PAD):
        raise ValueError(
            f"wscales: expected {padded(groups, AWQ_GROUP_PAD)} rows for {groups} groups, "
            f"got {wscales.shape[0]}"
        )
    return wscales[:groups].t().contiguous()


def pack_awq_zeros(scales: torch.Tensor, zero_point: int = AWQ_ZERO_POINT) -> torch.Tensor:
    """``wzeros`` [G', O] of a fixed zero point: ``-(zero_point * s)`` computed in float32 and
    rounded to the scales' 16-bit dtype (so ``w = q*s + wzeros``); padded groups 0.

    Parameters
    ----------
    scales : Tensor [O, G], 16-bit (the logical scales of :func:`pack_awq_scales`)
    """
    _check(scales, "scales", 2)
    zeros = (-(float(zero_point) * scales.float())).to(scales.dtype)
    return pack_awq_scales(zeros)


def unpack_awq_zeros(wzeros: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse layout of :func:`pack_awq_zeros`: [G', O] -> the scaled zeros [O, groups]
    (``w = q*s + zero``); see :func:`awq_zero_points` for the integer zero points."""
    return unpack_awq_scales(wzeros, groups)


def awq_zero_points(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Integer zero points ``round(-zero / s)`` [O, G] float32 of unpacked scaled zeros and
    scales (both [O, G]); 7 for files written by DeepCompressor or dcgen_quant. Where s = 0 the
    result is 0. The stored zero is ``-7*s`` rounded to 16 bits, so ``-zero/s`` is only close
    to 7: callers that need an exact integer check ``round`` against their tolerance."""
    s = scales.float()
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.where(s == 0, torch.zeros_like(s), torch.round(-zeros.float() / safe))


# --------------------------------------------------------------------------------------------
# adaLN row interleave and the folded +1


def interleave_adanorm(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """Reorder adaLN output rows so that stored row ``c*S + j`` is logical row ``j*(O/S) + c``.

    Parameters
    ----------
    t : Tensor [O, ...] (weight rows, per-row scales, or the bias), logical diffusers order:
        S chunks (shift, scale, gate[, shift2, scale2, gate2]) of O/S rows each
    chunks : S, 6 for ``AdaLayerNormZero`` (double blocks), 3 for ``AdaLayerNormZeroSingle``

    Returns
    -------
    Tensor [O, ...], the order in which Nunchaku's ``split_mod`` reads the GEMV output.
    """
    o = t.shape[0]
    if chunks < 1 or o % chunks:
        raise ValueError(f"adaLN: {o} rows do not split into {chunks} chunks")
    return t.reshape(chunks, o // chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def deinterleave_adanorm(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """Inverse of :func:`interleave_adanorm`."""
    o = t.shape[0]
    if chunks < 1 or o % chunks:
        raise ValueError(f"adaLN: {o} rows do not split into {chunks} chunks")
    return t.reshape(o // chunks, chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _scale_chunks(chunks: int) -> torch.Tensor:
    # The chunks that multiply as (1 + scale): index 1 and chunks-2 (1 and 4 of 6; 1 of 3).
    if chunks not in (3, 6):
        raise ValueError(f"adaLN: chunks must be 3 (single block) or 6 (double), got {chunks}")
    delta = torch.zeros(chunks, dtype=torch.float64)
    delta[1] = delta[chunks - 2] = 1.0
    return delta


def fold_adanorm_bias(bias: torch.Tensor, chunks: int) -> torch.Tensor:
    """Logical adaLN bias [O] -> Nunchaku's stored bias: interleaved, ``+1`` on the scale chunks
    (computed in float64 and rounded once to the bias dtype, as DeepCompressor's 16-bit add
    does). The ``+1`` lets the runtime use ``x * scale + shift`` without adding 1; in 16 bits
    ``b + 1`` is not exact for small ``b`` (see :func:`unfold_adanorm_bias`)."""
    _check(bias, "bias", 1)
    o = bias.shape[0]
    if chunks < 1 or o % chunks:
        raise ValueError(f"adaLN: {o} rows do not split into {chunks} chunks")
    delta = _scale_chunks(chunks).to(bias.device)
    folded = bias.double().reshape(chunks, o // chunks) + delta[:, None]
    return interleave_adanorm(folded.reshape(o).to(bias.dtype), chunks)


def unfold_adanorm_bias(bias: torch.Tensor, chunks: int) -> torch.Tensor:
    """Inverse of :func:`fold_adanorm_bias` up to the 16-bit rounding of ``b + 1``: stored bias
    [O] -> logical bias [O] (``- 1`` on the scale chunks in float64, rounded once)."""
    _check(bias, "bias", 1)
    o = bias.shape[0]
    logical = deinterleave_adanorm(bias, chunks).double().reshape(chunks, o // chunks)
    delta = _scale_chunks(chunks).to(bias.device)
    return (logical - delta[:, None]).reshape(o).to(bias.dtype)
