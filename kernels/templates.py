"""Kernel templates: Triton source with ``$kernel`` (the kernel's name) and ``$CONSTANTS`` (its constexpr sizes).

Shared conventions: one program per (token, head) row (lookup_pool: per token and column block); every load
is masked so sizes need not be powers of two; low-precision inputs are cast to float32 right after loading
and results cast to the output's dtype when stored; offsets into big tables are int64. A top-k carries its
indices by packing (score, index) into one uint64 key: the float32 score's bits made order-preserving in the
high word, the complement of the index in the low word, so a descending sort of keys orders by score, then
by ascending index (the kernels' tie order). Padding slots get key 0 and never win over a real candidate.
"""

PACKING = '''

@triton.jit
def pack_keys(scores, index, valid):
    """(score, index) -> uint64 key, descending by score, then ascending by index; 0 where not valid."""
    bits = scores.to(tl.float32).to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    key = ((bits ^ flip).to(tl.uint64) << 32) | (0xFFFFFFFF - index.to(tl.uint64))
    return tl.where(valid, key, 0)


@triton.jit
def key_index(key):
    """The index packed into keys."""
    return (0xFFFFFFFF - (key & 0xFFFFFFFF)).to(tl.int64)


@triton.jit
def key_score(key):
    """The float32 score packed into keys."""
    ordered = (key >> 32).to(tl.uint32)
    flip = tl.where((ordered >> 31) == 1, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    return (ordered ^ flip).to(tl.float32, bitcast=True)
'''

FOOTER = '''

CONSTANTS = dict($CONSTANTS)
SIGNATURE = $SIGNATURE  # argument -> Triton type, for ahead-of-time compiles
KERNEL = $kernel
'''

HEAD = '''"""A umc kernel (see the header): generated source, do not edit."""
import torch
import triton
import triton.language as tl
'''

COARSE_TOPM = HEAD + PACKING + '''

@triton.jit
def $kernel(q_ptr, keys_ptr, values_ptr, indices_ptr, HEADS: tl.constexpr, N: tl.constexpr, KD: tl.constexpr,
            BLOCK_D: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Top M of q . K[head, n, :] over the N keys of one (token, head), streaming over BLOCK_N keys (and BLOCK_D of
    their KD dims) at a time with a running top M_PAD: the scores never reach global memory."""
    row = tl.program_id(0).to(tl.int64)
    head = row % HEADS
    best = tl.zeros((M_PAD,), dtype=tl.uint64)
    for start in tl.range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        valid = keys < N
        scores = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in tl.range(0, KD, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            q = tl.load(q_ptr + row * KD + d, mask=d < KD, other=0.0).to(tl.float32)
            offsets = (head * N + keys[:, None]) * KD + d[None, :]
            k = tl.load(keys_ptr + offsets, mask=valid[:, None] & (d[None, :] < KD), other=0.0).to(tl.float32)
            scores += tl.sum(k * q[None, :], axis=1)
        block_best = tl.topk(pack_keys(scores, keys, valid), M_PAD)
        best = tl.topk(tl.cat(best, block_best, can_reorder=True), M_PAD)
    out = tl.arange(0, M_PAD)
    tl.store(values_ptr + row * M + out, key_score(best).to(values_ptr.dtype.element_ty), mask=out < M)
    tl.store(indices_ptr + row * M + out, key_index(best), mask=out < M)


def launch(q, keys):
    """values, indices (..., M) of the top M key scores of q (..., H, KD) against keys (H, N, KD)."""
    q = q.contiguous()
    rows = q.numel() // q.shape[-1]
    values = torch.empty(*q.shape[:-1], CONSTANTS["M"], dtype=q.dtype, device=q.device)
    indices = torch.empty(*q.shape[:-1], CONSTANTS["M"], dtype=torch.int64, device=q.device)
    if rows:
        $kernel[(rows,)](q, keys.contiguous(), values, indices, $CONSTANTS)
    return values, indices

''' + FOOTER

GRID_TOPM = HEAD + PACKING + '''

@triton.jit
def rank_scores(q_ptr, row, keys_ptr, index, head, valid, N: tl.constexpr, KD: tl.constexpr, BLOCK_D: tl.constexpr,
                R: tl.constexpr, R_PAD: tl.constexpr):
    """S[i, r] = q . K[head, index[i], :, r] for gathered keys, accumulated over BLOCK_D dims at a time:
    (len(index), R_PAD) in float32."""
    r = tl.arange(0, R_PAD)
    out = tl.zeros((index.shape[0], R_PAD), dtype=tl.float32)
    for d0 in tl.range(0, KD, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + row * KD + d, mask=d < KD, other=0.0).to(tl.float32)
        offsets = ((head * N + index[:, None, None]) * KD + d[None, :, None]) * R + r[None, None, :]
        mask = valid[:, None, None] & (d[None, :, None] < KD) & (r[None, None, :] < R)
        k = tl.load(keys_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        out += tl.sum(k * q[None, :, None], axis=1)
    return out


@triton.jit
def core_matrix(cores_ptr, head, c, CORES: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr):
    """C_c of this head, (R_PAD, R_PAD) in float32 (zero-padded)."""
    a = tl.arange(0, R_PAD)
    offsets = ((head * CORES + c) * R + a[:, None]) * R + a[None, :]
    return tl.load(cores_ptr + offsets, mask=(a[:, None] < R) & (a[None, :] < R), other=0.0).to(tl.float32)


@triton.jit
def $kernel(q_row_ptr, q_col_ptr, keys_row_ptr, keys_col_ptr, i_row_ptr, i_col_ptr, cores_ptr, address_ptr,
            scores_ptr, HEADS: tl.constexpr, N: tl.constexpr, KD: tl.constexpr, BLOCK_D: tl.constexpr,
            R: tl.constexpr, R_PAD: tl.constexpr, CORES: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
            BLOCK_I: tl.constexpr):
    """For one (token, head): the winners' rank scores per side, the M x M grid sum_c S_row C_c S_colᵀ taken
    BLOCK_I rows at a time with a running top M (grid addresses i_row[i] * N + i_col[j]), and each core's score
    at the winners."""
    row = tl.program_id(0).to(tl.int64)
    head = row % HEADS
    j = tl.arange(0, M_PAD)
    valid_j = j < M
    cols = tl.load(i_col_ptr + row * M + j, mask=valid_j, other=0)
    s_col = rank_scores(q_col_ptr, row, keys_col_ptr, cols, head, valid_j, N, KD, BLOCK_D, R, R_PAD)
    best = tl.zeros((M_PAD,), dtype=tl.uint64)
    for i0 in tl.range(0, M, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        valid_i = i < M
        rows = tl.load(i_row_ptr + row * M + i, mask=valid_i, other=0)
        s_row = rank_scores(q_row_ptr, row, keys_row_ptr, rows, head, valid_i, N, KD, BLOCK_D, R, R_PAD)
        total = tl.zeros((BLOCK_I, M_PAD), dtype=tl.float32)
        for c in tl.static_range(CORES):
            left = tl.sum(s_row[:, :, None] * core_matrix(cores_ptr, head, c, CORES, R, R_PAD)[None, :, :], axis=1)
            total += tl.sum(left[:, None, :] * s_col[None, :, :], axis=2)
        position = i[:, None] * M_PAD + j[None, :]
        keys = pack_keys(total, position, valid_i[:, None] & valid_j[None, :])
        block_best = tl.topk(tl.reshape(keys, (BLOCK_I * M_PAD,)), M_PAD)
        best = tl.topk(tl.cat(best, block_best, can_reorder=True), M_PAD)
    winner = key_index(best)
    win_row = tl.load(i_row_ptr + row * M + winner // M_PAD, mask=valid_j, other=0)
    win_col = tl.load(i_col_ptr + row * M + winner % M_PAD, mask=valid_j, other=0)
    tl.store(address_ptr + row * M + j, win_row * N + win_col, mask=valid_j)
    w_row = rank_scores(q_row_ptr, row, keys_row_ptr, win_row, head, valid_j, N, KD, BLOCK_D, R, R_PAD)
    w_col = rank_scores(q_col_ptr, row, keys_col_ptr, win_col, head, valid_j, N, KD, BLOCK_D, R, R_PAD)
    for c in tl.static_range(CORES):
        left = tl.sum(w_row[:, :, None] * core_matrix(cores_ptr, head, c, CORES, R, R_PAD)[None, :, :], axis=1)
        score = tl.sum(left * w_col, axis=1)
        tl.store(scores_ptr + (row * M + j) * CORES + c, score.to(scores_ptr.dtype.element_ty), mask=valid_j)


def launch(q_row, q_col, keys_row, keys_col, i_row, i_col, cores):
    """address (..., M) and per-core scores (..., M, CORES) of the top M of the Tucker grid over i_row x i_col."""
    q_row, q_col = q_row.contiguous(), q_col.contiguous()
    rows = q_row.numel() // q_row.shape[-1]
    address = torch.empty(*i_row.shape, dtype=torch.int64, device=q_row.device)
    scores = torch.empty(*i_row.shape, CONSTANTS["CORES"], dtype=q_row.dtype, device=q_row.device)
    if rows:
        $kernel[(rows,)](q_row, q_col, keys_row.contiguous(), keys_col.contiguous(), i_row.contiguous(),
                         i_col.contiguous(), cores.contiguous(), address, scores, $CONSTANTS)
    return address, scores

''' + FOOTER

LOOKUP_POOL = HEAD + '''

@triton.jit
def $kernel(table_ptr, address_ptr, scores_ptr, perm_ptr, out_ptr, K: tl.constexpr, K_PAD: tl.constexpr,
            VDIM: tl.constexpr, BLOCK_V: tl.constexpr, CORES: tl.constexpr, NPHYS: tl.constexpr, E: tl.constexpr,
            HAS_PERM: tl.constexpr):
    """For one token and BLOCK_V columns: its K picks mapped through the shuffle to (physical row, virtual block),
    value rows scaled per core slice by that core's score, summed in float32 into the E blocks."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    k = tl.arange(0, K_PAD)
    picked = k < K
    in_cols = cols < VDIM
    address = tl.load(address_ptr + token * K + k, mask=picked, other=0)
    if HAS_PERM:
        address = tl.load(perm_ptr + address, mask=picked, other=0)
    physical = address % NPHYS
    block = address // NPHYS
    core = cols // (VDIM // CORES)
    both = picked[:, None] & in_cols[None, :]
    weights = tl.load(scores_ptr + (token * K + k[:, None]) * CORES + core[None, :], mask=both, other=0.0)
    values = tl.load(table_ptr + physical[:, None].to(tl.int64) * VDIM + cols[None, :], mask=both, other=0.0)
    weighted = values.to(tl.float32) * weights.to(tl.float32)
    for e in tl.static_range(E):
        pooled = tl.sum(tl.where((block == e)[:, None], weighted, 0.0), axis=0)
        tl.store(out_ptr + (token * E + e) * VDIM + cols, pooled.to(out_ptr.dtype.element_ty), mask=in_cols)


def launch(table, address, scores, perm=None):
    """Pooled blocks (B, T, E * VDIM) of grid addresses (B, T, H, m) with per-core scores (B, T, H, m, CORES)."""
    tokens = address.shape[0] * address.shape[1]
    out = torch.empty(address.shape[0], address.shape[1], CONSTANTS["E"] * CONSTANTS["VDIM"], dtype=table.dtype,
                      device=table.device)
    address = address.contiguous()
    if tokens:
        grid = (tokens, triton.cdiv(CONSTANTS["VDIM"], CONSTANTS["BLOCK_V"]))
        $kernel[grid](table.contiguous(), address, scores.contiguous(), address if perm is None else perm.contiguous(),
                      out, $CONSTANTS)
    return (out,)

''' + FOOTER
