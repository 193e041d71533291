"""The compiled body of :mod:`dice_influence._perm_kernel` (imported only when numba is
there; module-level functions so that numba's on-disk cache serves every later process)."""

from __future__ import annotations

import numba as nb
import numpy as np

u32, u64 = np.uint32, np.uint64
MULT_HI, MULT_LO = u64(2549297995355413924), u64(4865540595714422341)  # PCG 128-bit multiplier


@nb.njit(cache=True, nogil=True)
def hashmix(value, hc):
    value ^= hc[0]
    hc[0] = u32(hc[0] * u32(0x931E8875))
    value = u32(value * hc[0])
    return value ^ (value >> u32(16))


@nb.njit(cache=True, nogil=True)
def mix(x, y):
    r = u32(u32(u32(0xCA01F9DD) * x) - u32(u32(0x4973F715) * y))
    return r ^ (r >> u32(16))


@nb.njit(cache=True, nogil=True)
def mul64(a, b):  # (hi, lo) of the 128-bit product
    m = u64(0xFFFFFFFF)
    a0, a1, b0, b1 = a & m, a >> u64(32), b & m, b >> u64(32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> u64(32)) + (p01 & m) + (p10 & m)
    return (p11 + (p01 >> u64(32)) + (p10 >> u64(32)) + (mid >> u64(32)),
            (p00 & m) | ((mid & m) << u64(32)))


@nb.njit(cache=True, nogil=True)
def step(sh, sl, ih, il):  # state <- state * mult + inc (mod 2**128)
    hi, lo = mul64(sl, MULT_LO)
    hi = hi + sl * MULT_HI + sh * MULT_LO
    lo2 = lo + il
    return hi + ih + (u64(1) if lo2 < lo else u64(0)), lo2


@nb.njit(cache=True, nogil=True)
def permutation(seed, k, e, m, out):
    ent = np.empty(4, np.uint32)  # SeedSequence([seed, k, e]), pool size 4
    ent[0], ent[1], ent[2], ent[3] = seed, k, e, 0
    hc = np.empty(1, np.uint32)
    hc[0] = u32(0x43B0D7E5)
    pool = np.empty(4, np.uint32)
    for i in range(4):
        pool[i] = hashmix(ent[i], hc)
    for s in range(4):
        for d in range(4):
            if s != d:
                pool[d] = mix(pool[d], hashmix(pool[s], hc))
    hb = u32(0x8B51F9DD)  # generate_state(4, uint64)
    w = np.empty(4, np.uint64)
    for i in range(8):
        v = pool[i % 4] ^ hb
        hb = u32(hb * u32(0x58F38DED))
        v = u32(v * hb)
        v ^= v >> u32(16)
        if i % 2 == 0:
            w[i // 2] = u64(v)
        else:
            w[i // 2] |= u64(v) << u64(32)
    ih = (w[2] << u64(1)) | (w[3] >> u64(63))  # PCG64 srandom(state w0:w1, seq w2:w3)
    il = (w[3] << u64(1)) | u64(1)
    sh, sl = step(u64(0), u64(0), ih, il)
    lo = sl + w[1]
    sh, sl = step(sh + w[0] + (u64(1) if lo < sl else u64(0)), lo, ih, il)
    for i in range(m):
        out[i] = i
    have = False
    spare = u32(0)
    for i in range(m - 1, 0, -1):  # Generator.shuffle: j = random_interval(i)
        mask = u64(i)
        for sft in (1, 2, 4, 8, 16, 32):
            mask |= mask >> u64(sft)
        while True:
            if have:
                r = spare
                have = False
            else:  # next_uint32: low half now, high half next time
                sh, sl = step(sh, sl, ih, il)
                x = sh ^ sl
                rot = sh >> u64(58)
                v = (x >> rot) | (x << ((u64(64) - rot) & u64(63)))
                r = u32(v & u64(0xFFFFFFFF))
                spare = u32(v >> u64(32))
                have = True
            j = u64(r) & mask
            if j <= u64(i):
                break
        jj = np.int64(j)
        tmp = out[jj]
        out[jj] = out[i]
        out[i] = tmp


@nb.njit(cache=True, nogil=True)
def batch_rows(seed, sizes, per_epoch, t, b, out, scratch):
    for k in range(sizes.shape[0]):
        e = t // per_epoch[k]
        j = t - e * per_epoch[k]
        permutation(seed, k, e, sizes[k], scratch)
        out[k, :] = scratch[j * b : (j + 1) * b]
