"""Next-token sampling that picks the same token as llama-cpp-python's sampler chain, bit for bit.

What llama.cpp does (llama-cpp-python 0.3.36: llama_cpp/llama.py ``Llama._init_sampler``, ``Llama.generate``,
``Llama.sample``, llama_cpp/_internals.py ``LlamaSampler``; vendor/llama.cpp/src/llama-sampler.cpp), and so this
module does:

* **A new chain per generation.** ``Llama.generate`` calls ``_init_sampler`` on every call, seeded with
  ``Llama._seed``; ``llama_sampler_sample`` accepts each token it picks into the chain. So the repeat penalty's window
  is the last ``last_n_tokens_size`` (64) tokens *sampled in this call*: never the prompt, never an earlier answer.
  A token in the window has its logit divided by the penalty if it is > 0, else multiplied (once, whatever its
  count; frequency and presence penalties are 0). A penalty of 1.0f disables the stage.
* **The order.** ``temperature < 0``: penalties, then dist on the whole vocabulary. ``temperature == 0``: penalties,
  then greedy (the first largest logit in token-id order). Otherwise penalties, top-k, typical (p = 1.0: disabled),
  top-p, min-p, temperature, dist; every filter keeps at least ``min_keep`` = 1 token.
* **top-k** (k <= 0: off) sorts the candidates by logit, descending, and keeps k. **top-p** (p >= 1.0f: off) takes
  the float32 softmax of the candidates and keeps the shortest sorted prefix whose float32 running sum reaches p.
  **min-p** (p <= 0: off) works on logits: it keeps ``logit >= max_logit + logf(p)`` (in place, in the current order,
  when the candidates are not sorted). **temperature** divides the logits (float32; 1.0f: off).
* **dist** draws ``rnd = std::uniform_real_distribution<double>(0, 1)(rng)`` from a ``std::mt19937`` seeded with the
  seed: libstdc++'s ``generate_canonical<double, 53>`` takes two 32-bit outputs, ``(x0 + x1 * 2^32) / 2^64`` in double
  (1.0 becomes the double below 1). Then ``p_i = expf(logit_i - max)`` (float), summed in double in the candidates'
  current order, and it picks the first i whose running sum is ``>= sum * rnd``. It draws even when one candidate is
  left. ``numpy.random.RandomState(seed)`` seeds MT19937 exactly as ``std::mt19937(seed)`` does (init_genrand).
* **Seeds** are uint32 (ctypes keeps the low 32 bits); ``LLAMA_DEFAULT_SEED`` (0xFFFFFFFF) means a random seed
  (``std::random_device``), as ``seed=None`` does here.
* **Order among equal logits** comes from libstdc++'s ``std::partial_sort`` (heap select; top-k <= 128) or from
  llama.cpp's bucket sort (128 buckets over [-10, 10), ``std::sort`` in each, used for more candidates and by top-p on
  an unsorted vocabulary). Without ties any sort gives that order, so ties are looked for first and the libstdc++
  (GCC 12) algorithms are replayed in Python only when they can change the outcome.
* **expf** is glibc's (2.27+, its FMA variant; checked against libm on 3e7 inputs): its last bit decides some draws.
"""

from __future__ import annotations

import ctypes
import math
import secrets
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

PENALTY_LAST_N = 64  # Llama(last_n_tokens_size=64): the penalties sampler's ring buffer
MIN_KEEP = 1  # _init_sampler: min_keep = max(1, n_probs) with n_probs = 0
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
HEAP_SORT_MAX = 128  # llama_token_data_array_partial_sort_inplace: std::partial_sort up to here, buckets above
TOP_P_FIRST = 256  # top-p on > 1024 unsorted candidates sorts the first 256, then all if they fall short
TOP_P_ADAPTIVE_ABOVE = 1024

F32 = np.float32


# ---- glibc's expf and logf -------------------------------------------------------------------------------------------

# sysdeps/ieee754/flt-32/e_expf.c and e_exp2f_data.c: 2^(i/32) as binary64 words minus i << 47
_EXP2F_TAB = np.array([
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b,
    0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715, 0x3feef1a7373aa9cb,
    0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d, 0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540], dtype=np.uint64)
_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * 32
_INVLN2N_HI = float.fromhex("0x1.71547652p+5")  # 27 bits: times a float32, exact in a double
_INVLN2N_LO = _INVLN2N - _INVLN2N_HI
_SHIFT = float.fromhex("0x1.8p+52")
_C0 = float.fromhex("0x1.c6af84b912394p-5") / 32 ** 3
_C1 = float.fromhex("0x1.ebfce50fac4f3p-3") / 32 ** 2
_C2 = float.fromhex("0x1.62e42ff0c52d6p-1") / 32
_EXPF_UNDERFLOW = float.fromhex("-0x1.9fe368p6")  # below log(2^-150): 0


def expf(x: np.ndarray) -> np.ndarray:
    """glibc's ``expf`` of float32 ``x <= 0``, vectorized; its FMA build computes ``r`` with one rounding."""
    xd = x.astype(np.float64)
    with np.errstate(all="ignore"):  # -inf gives NaN here, and 0 below
        z = _INVLN2N * xd
        kd = z + _SHIFT  # rounds z to an integer k, kept in the low bits
        ki = kd.view(np.uint64)
        kd = kd - _SHIFT
        r = (_INVLN2N_HI * xd - kd) + _INVLN2N_LO * xd  # fma(InvLn2N, xd, -kd)
        s = (_EXP2F_TAB[ki % np.uint64(32)] + (ki << np.uint64(47))).view(np.float64)  # 2^(k/32)
        y = ((_C0 * r + _C1) * (r * r) + (_C2 * r + 1.0)) * s
        out = y.astype(F32)
    out[~(xd >= _EXPF_UNDERFLOW)] = 0.0  # -inf, and NaN (no NaN logits reach here)
    return out


def _libm_logf() -> Any:
    try:
        fn = ctypes.CDLL(None).logf
    except (AttributeError, OSError, TypeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


_LOGF = _libm_logf()


def logf(p: np.float32) -> np.float32:
    """The C library's ``logf`` (min-p's threshold), or a correctly rounded float32 log where there is none."""
    return F32(_LOGF(p)) if _LOGF is not None else F32(math.log(p))


# ---- libstdc++'s sorts, replayed where equal logits make their order matter -----------------------------------------
# bits/stl_heap.h and bits/stl_algo.h (GCC 12) with llama.cpp's comparator a.logit > b.logit: the heap's top is the
# smallest kept logit. Items are (logit, position) tuples; only [0] is compared, as in C.


def _adjust_heap(a: list, f: int, hole: int, n: int, value: tuple) -> None:
    top = child = hole
    while child < (n - 1) // 2:
        child = 2 * (child + 1)
        if a[f + child][0] > a[f + child - 1][0]:
            child -= 1
        a[f + hole] = a[f + child]
        hole = child
    if n % 2 == 0 and child == (n - 2) // 2:
        child = 2 * (child + 1)
        a[f + hole] = a[f + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2  # __push_heap
    while hole > top and a[f + parent][0] > value[0]:
        a[f + hole] = a[f + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[f + hole] = value


def _make_heap(a: list, f: int, n: int) -> None:
    if n < 2:
        return
    for parent in range((n - 2) // 2, -1, -1):
        _adjust_heap(a, f, parent, n, a[f + parent])


def _sort_heap(a: list, f: int, n: int) -> None:
    while n > 1:
        n -= 1
        value, a[f + n] = a[f + n], a[f]  # __pop_heap(first, last, last)
        _adjust_heap(a, f, 0, n, value)


def _partial_sort(a: list, f: int, mid: int, last: int) -> None:
    """std::partial_sort(a + f, a + mid, a + last): __heap_select, then __sort_heap."""
    _make_heap(a, f, mid - f)
    for i in range(mid, last):
        if a[i][0] > a[f][0]:
            value, a[i] = a[i], a[f]  # __pop_heap(first, middle, i)
            _adjust_heap(a, f, 0, mid - f, value)
    _sort_heap(a, f, mid - f)


def _linear_insert(a: list, i: int) -> None:
    value, j = a[i], i - 1
    while value[0] > a[j][0]:
        a[i] = a[j]
        i, j = j, j - 1
    a[i] = value


def _introsort(a: list, f: int, last: int, depth: int) -> None:
    while last - f > 16:  # _S_threshold
        if depth == 0:
            _partial_sort(a, f, last, last)
            return
        depth -= 1
        x, y, z = f + 1, f + (last - f) // 2, last - 1  # __move_median_to_first
        if a[x][0] > a[y][0]:
            m = y if a[y][0] > a[z][0] else z if a[x][0] > a[z][0] else x
        else:
            m = x if a[x][0] > a[z][0] else z if a[y][0] > a[z][0] else y
        a[f], a[m] = a[m], a[f]
        pivot, lo, hi = a[f][0], f + 1, last  # __unguarded_partition
        while True:
            while a[lo][0] > pivot:
                lo += 1
            hi -= 1
            while pivot > a[hi][0]:
                hi -= 1
            if not lo < hi:
                break
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1
        _introsort(a, lo, last, depth)
        last = lo


def _std_sort(a: list) -> None:
    """std::sort(a.begin(), a.end()): introsort to runs of 16, then insertion sort."""
    n = len(a)
    if n == 0:
        return
    _introsort(a, 0, n, 2 * (n.bit_length() - 1))
    for i in range(1, min(n, 16)):  # __insertion_sort of the first 16
        if a[i][0] > a[0][0]:
            a[1:i + 1], a[0] = a[0:i], a[i]
        else:
            _linear_insert(a, i)
    for i in range(16, n):  # __unguarded_insertion_sort
        _linear_insert(a, i)


def _heap_order(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of std::partial_sort(data, data + k, data + size): the k largest, largest first."""
    a = [(float(v), i) for i, v in enumerate(x[:k].tolist())]
    _make_heap(a, 0, k)
    start, block = k, 256
    while start < x.size:  # only a logit above the heap's smallest enters: skip the rest with numpy
        chunk = x[start:start + block]
        for j in np.flatnonzero(chunk > a[0][0]).tolist():
            v = float(chunk[j])
            if v > a[0][0]:
                _adjust_heap(a, 0, 0, k, (v, start + j))
        start, block = start + block, min(block * 2, 8192)
    _sort_heap(a, 0, k)
    return np.array([i for _v, i in a], dtype=np.int64)


def _buckets(x: np.ndarray) -> np.ndarray:
    """llama_token_data_array_partial_sort's bucket of each logit: int(6.4f * v + 64.0f) in float32, in [0, 127]."""
    with np.errstate(invalid="ignore"):
        b = (F32(128 / 20) * x + F32(64.0)).astype(np.int32)  # int() truncates; inf and NaN give INT_MIN, as cvttss2si
    return np.clip(b, 0, 127)


def _bucket_order(x: np.ndarray, npartial: int, need: int) -> np.ndarray:
    """The first ``need`` positions of llama_token_data_array_partial_sort(cur, npartial): buckets from the top, each
    std::sort-ed (the last one std::partial_sort-ed to npartial), replayed only where equal logits are in reach."""
    b = _buckets(x)
    histo = np.bincount(b, minlength=128)
    ib = 127 - int(np.argmax(np.cumsum(histo[::-1]) >= npartial))
    ndone = int(histo[ib + 1:].sum())
    cut = np.sort(x)[::-1][need - 1]  # the order matters only among logits >= cut
    sel = np.flatnonzero(b >= ib)
    sel = sel[np.argsort(-b[sel], kind="stable")]  # bucket by bucket from the top, each in index order
    out: list[np.ndarray] = []
    got, start = 0, 0
    for j in range(127, ib - 1, -1):
        members = sel[start:start + int(histo[j])]
        start += int(histo[j])
        vals = x[members]
        top = np.sort(vals[vals >= cut])
        if top.size > 1 and np.any(top[1:] == top[:-1]):
            a = [(float(v), int(i)) for v, i in zip(vals.tolist(), members.tolist(), strict=True)]
            if j > ib:
                _std_sort(a)
            else:
                _partial_sort(a, 0, npartial - ndone, len(a))
            order = np.array([i for _v, i in a], dtype=np.int64)
        else:
            order = members[np.argsort(-vals, kind="stable")]
        out.append(order)
        got += order.size
        if got >= need:
            break
    return np.concatenate(out)[:need]


def _llama_order(x: np.ndarray, npartial: int, need: int, buckets: bool) -> np.ndarray:
    """Positions of the first ``need`` candidates after llama.cpp sorts ``x`` to ``npartial``: with the bucket sort, or
    with ``llama_token_data_array_partial_sort_inplace`` (std::partial_sort up to 128, buckets above)."""
    m = min(need + 1, x.size)
    top = np.argpartition(-x, m - 1)[:m] if m < x.size else np.arange(x.size)
    top = top[np.argsort(-x[top], kind="stable")]
    v = x[top]
    if not np.any(v[1:] == v[:-1]):
        return top[:need]  # no equal logits within reach: every sort agrees
    if buckets or npartial > HEAP_SORT_MAX:
        return _bucket_order(x, npartial, need)
    return _heap_order(x, npartial)[:need]


def _descending(x: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n largest logits, largest first, in any order among equals."""
    top = np.argpartition(-x, n - 1)[:n] if n < x.size else np.arange(x.size)
    return top[np.argsort(-x[top], kind="stable")]


# ---- the chain -------------------------------------------------------------------------------------------------------


def resolve_seed(seed: int | None) -> int:
    """The uint32 that seeds std::mt19937 in llama.cpp's dist sampler: the low 32 bits; LLAMA_DEFAULT_SEED or
    ``None`` draw a random one (llama-sampler.cpp get_rng_seed)."""
    s = LLAMA_DEFAULT_SEED if seed is None else int(seed) & 0xFFFFFFFF
    return secrets.randbits(32) if s == LLAMA_DEFAULT_SEED else s


class Sampler:
    """One generation's sampler chain, as ``Llama.generate`` builds it: settings ``s`` (keys as in
    :class:`~mixrun.backends.base.Sampling`), a penalty window that starts empty, and an MT19937 seeded once."""

    def __init__(self, s: Mapping[str, Any]) -> None:
        self.temperature = float(s.get("temperature", 0.0))  # _init_sampler compares it as a Python float
        self.top_k = int(s.get("top_k", 0))
        self.top_p = F32(s.get("top_p", 1.0))  # the C samplers hold float32
        self.min_p = F32(s.get("min_p", 0.0))
        self.penalty = F32(s.get("repeat_penalty", 1.0))
        self.seed = resolve_seed(s.get("seed"))
        self.rng = np.random.RandomState(self.seed)
        self.window: deque[int] = deque()
        self.counts: dict[int, int] = {}

    def accept(self, token: int) -> None:
        """llama_sampler_penalties_accept: the last PENALTY_LAST_N accepted tokens, with their counts."""
        if len(self.window) >= PENALTY_LAST_N:
            old = self.window.popleft()
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.window.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1

    def uniform(self) -> float:
        """std::uniform_real_distribution<double>(0, 1)(mt19937), libstdc++: generate_canonical<double, 53>."""
        lo, hi = self.rng.randint(0, 1 << 32, size=2, dtype=np.uint32).tolist()  # two raw outputs
        r = (float(lo) + float(hi) * 4294967296.0) / 18446744073709551616.0
        return r if r < 1.0 else math.nextafter(1.0, 0.0)

    def sample(self, logits: Any) -> int:
        """The token llama_sampler_sample picks from ``logits`` (vocab,) (a tensor or an array); it is accepted."""
        if hasattr(logits, "detach"):
            logits = logits.detach().float().cpu().numpy()
        x = np.array(logits, dtype=F32)  # a copy: the stages write to it
        if self.penalty != F32(1.0) and self.counts:
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            v = x[ids]
            x[ids] = np.where(v <= 0, v * self.penalty, v / self.penalty)
        if self.temperature == 0.0:
            token = int(np.argmax(x))  # greedy: the first largest logit
        elif self.temperature < 0.0:
            token = self._dist(np.arange(x.size), x, False)
        else:
            token = self._filtered(x)
        self.accept(token)
        return token

    def _filtered(self, x: np.ndarray) -> int:
        ids, is_sorted = np.arange(x.size), False
        if self.top_k > 0:  # llama_sampler_top_k_impl
            order = _llama_order(x, min(self.top_k, x.size), min(self.top_k, x.size), buckets=False)
            ids, x, is_sorted = ids[order], x[order], True
        if self.top_p < F32(1.0):
            order = self._top_p(x, is_sorted)
            ids, x, is_sorted = ids[order], x[order], True
        if self.min_p > F32(0.0):
            ids, x, is_sorted = self._min_p(ids, x, is_sorted)
        temp = F32(self.temperature)
        if temp != F32(1.0):  # llama_sampler_temp_impl (temp rounds to 0.0f only for tiny temperatures)
            if temp <= 0:  # the first largest logit stays, the rest become -inf
                first = int(np.argmax(x))
                x = np.where(np.arange(x.size) == first, x, F32(-np.inf))
            else:
                x = x / temp
        return self._dist(ids, x, is_sorted)

    def _top_p(self, x: np.ndarray, is_sorted: bool) -> np.ndarray:
        """Positions kept by llama_sampler_top_p_apply, in the order it leaves them (sorted by logit)."""
        p = expf(x - (x[0] if is_sorted else x.max()))  # llama_sampler_softmax_impl(cur_p, false)
        p = p / np.cumsum(p, dtype=F32)[-1]
        if is_sorted:
            order = np.arange(x.size)
        else:  # ties do not move the cut (equal logits, equal p): find it in numpy's order first
            adaptive = x.size > TOP_P_ADAPTIVE_ABOVE
            order = _descending(x, min(TOP_P_FIRST, x.size) if adaptive else x.size)
        last = self._cut(p[order])
        if last is None and order.size < x.size:
            order = _descending(x, x.size)
            last = self._cut(p[order])
        n = x.size if last is None else last
        if is_sorted:
            return order[:n]
        if x.size > TOP_P_ADAPTIVE_ABOVE:
            return _llama_order(x, TOP_P_FIRST if n <= TOP_P_FIRST else x.size, n, buckets=True)
        return _llama_order(x, x.size, n, buckets=False)

    def _cut(self, p: np.ndarray) -> int | None:
        """The length of the shortest prefix whose float32 running sum reaches top_p (at least MIN_KEEP)."""
        cum = np.cumsum(p, dtype=F32)
        hit = np.flatnonzero((cum >= self.top_p) & (np.arange(1, p.size + 1) >= MIN_KEEP))
        return int(hit[0]) + 1 if hit.size else None

    def _min_p(self, ids: np.ndarray, x: np.ndarray, is_sorted: bool) -> tuple[np.ndarray, np.ndarray, bool]:
        """llama_sampler_min_p_apply: a filter in place when unsorted, a prefix when sorted."""
        lp = logf(self.min_p)
        if not is_sorted:
            keep = x >= F32(max(F32(-3.4028235e38), x.max()) + lp)
            if keep.any() and np.count_nonzero(keep) >= MIN_KEEP:
                return ids[keep], x[keep], False
            order = _descending(x, x.size)
            n = self._min_p_prefix(x[order], lp)
            order = _llama_order(x, x.size, n, buckets=False)
            return ids[order], x[order], True
        n = self._min_p_prefix(x, lp)
        return ids[:n], x[:n], True

    @staticmethod
    def _min_p_prefix(x: np.ndarray, lp: np.float32) -> int:
        """Sorted candidates: stop at the first logit below ``x[0] + logf(p)`` after the first max(1, MIN_KEEP)."""
        start = max(1, MIN_KEEP)
        below = np.flatnonzero(x[start:] < x[0] + lp)
        return start + int(below[0]) if below.size else x.size

    def _dist(self, ids: np.ndarray, x: np.ndarray, is_sorted: bool) -> int:
        """llama_sampler_dist_apply: one uniform draw, always; float expf, double running sums."""
        rnd = self.uniform()
        if x.size == 1:
            return int(ids[0])
        p = expf(x - (x[0] if is_sorted else x.max()))
        cum = np.cumsum(p.astype(np.float64))
        i = int(np.searchsorted(cum, cum[-1] * rnd, side="left"))
        return int(ids[min(i, x.size - 1)])
