"""Seeded Gaussian random projection g̃ = Pᵀ g (stage 1; the paper's d ≈ 400; docs/design.md,
"Stage 1").

P = Z / √d, with Z a p × d matrix of independent standard normals, so P has N(0, 1/d) entries and
E[⟨Pᵀa, Pᵀb⟩] = ⟨a, b⟩ (Johnson–Lindenstrauss). Z is never stored: its row block k (rows
k·block_rows … (k+1)·block_rows − 1) is generated from (seed, k) alone with numpy's counter-based
Philox generator and the ziggurat normal sampler, column after column, so every process,
machine, CPU or GPU gets the same bits — and the first d′ columns of Z are the same for every
d ≥ d′: the projection at d′ is Z[:, :d′] / √d′ (:meth:`GaussianProjector.at_dim`), which is how
one stage-1 pass serves several d (``features``: the files store Zᵀg, unscaled).

Blocks are kept as Zᵀ (d × rows, the order they are drawn in: no transpose to pay) in float64,
the precision the products accumulate in, up to ``cache_bytes`` and regenerated beyond that;
the blocks one product needs are drawn on several threads at once when they all fit (each
block has its own generator, and numpy draws without holding the GIL); by default the budget is a quarter of the memory available on the
projector's device, which holds Z whole for models up to a few billion parameters with LoRA on
two projections (SmolLM2-135M, r = 8 on q, v: p·d·8 bytes = 1.5 GB at d = 400).
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from .runtime import check_stop


def _block_key(seed: int, block: int) -> int:
    digest = hashlib.sha256(f"ensemble-lora/projection/{seed}/{block}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def available_memory(device: torch.device) -> int:
    """Bytes free on the device now (CUDA), or the host's MemAvailable (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 30


class GaussianProjector:
    """P = Z[:, :d] / √d (see the module docstring). ``project`` gives Pᵀg, ``project_unit``
    Zᵀg (what stage 1 stores), ``expand`` P x."""

    def __init__(self, p: int, d: int, seed: int = 0, block_rows: int = 32768,
                 cache_bytes: int | None = None, device: str | torch.device = "cpu"):
        if d <= 0 or p <= 0:
            raise ValueError(f"projection dimensions must be positive (p={p}, d={d})")
        if d > p:
            raise ValueError(f"projection dimension d={d} is larger than the number of adapter "
                             f"parameters p={p}; choose d <= p")
        self.p, self.d, self.seed, self.block_rows = int(p), int(d), int(seed), int(block_rows)
        self.device = torch.device(device)
        self.cache_bytes = (available_memory(self.device) // 4 if cache_bytes is None
                            else int(cache_bytes))
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # float64 Zᵀ blocks
        self._cached_bytes = 0

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.p / self.block_rows)

    @property
    def scale(self) -> np.float32:
        """1/√d in float32: Pᵀg = float32(Zᵀg) · scale."""
        return np.float32(1.0 / math.sqrt(self.d))

    def block(self, k: int) -> torch.Tensor:
        """Rows [k·block_rows, min(p, (k+1)·block_rows)) of Z (unit normals) as float32."""
        return self._block64(k).float().contiguous()  # exact: float64 holding float32 values

    def _generate(self, k: int) -> torch.Tensor:
        """Zᵀ of row block k: [d, rows] float64, contiguous."""
        rows = min(self.block_rows, self.p - k * self.block_rows)
        rng = np.random.Generator(np.random.Philox(key=_block_key(self.seed, k)))
        # column after column of Z: column j is the j-th run of `rows` draws, the same for every d
        z = rng.standard_normal((self.d, rows), dtype=np.float32)
        return torch.from_numpy(z).to(self.device, torch.float64)

    def _keep(self, k: int, t: torch.Tensor) -> None:
        nbytes = t.numel() * 8
        if nbytes <= self.cache_bytes:
            self._cache[k] = t
            self._cached_bytes += nbytes
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.numel() * 8

    def _block64(self, k: int) -> torch.Tensor:
        """Rows of block k of Z as a [rows, d] float64 view (of the cached Zᵀ block)."""
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit.T
        check_stop()  # a block of a large P takes seconds to draw
        t = self._generate(k)
        self._keep(k, t)
        return t.T

    def _prefetch(self, blocks: Sequence[int]) -> None:
        """Draw the missing ones of ``blocks`` on up to torch.get_num_threads() threads, when
        all of them fit in the cache together (otherwise they stream one by one, as used)."""
        blocks = list(dict.fromkeys(blocks))
        missing = [k for k in blocks if k not in self._cache]
        workers = min(len(missing), max(1, torch.get_num_threads()))
        need = sum(min(self.block_rows, self.p - k * self.block_rows) for k in blocks) * self.d * 8
        if workers < 2 or need > self.cache_bytes:
            return
        with ThreadPoolExecutor(workers) as pool:
            for k, t in zip(missing, pool.map(self._generate, missing)):
                self._keep(k, t)

    def project(self, g: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """g: [N, p] -> Pᵀg per row: [N, d] float32, = :meth:`project_unit` · :attr:`scale`."""
        return self.project_unit(g) * torch.tensor(self.scale)

    def project_unit(self, g: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """g: [N, p] (any float dtype, any device) -> Zᵀg per row: [N, d] float32.

        ``g`` may also be a list of [N, p_i] column chunks with Σ p_i = p, in order (e.g. one per
        adapter matrix), which spares the caller concatenating them into one [N, p] tensor.

        Accumulated in float64 and rounded once: a float32 matmul's summation order depends on
        the BLAS library and its thread count, so its last bits would differ between machines
        and processes; the float64 sums of the same inputs round to the same float32 values.

        An all-zero chunk is skipped (its product is exactly zero): with the usual LoRA init
        (B = 0) the gradient of every A matrix is exactly zero at θ*, half of p."""
        parts = [g] if isinstance(g, torch.Tensor) else list(g)
        width = sum(int(x.shape[-1]) for x in parts)
        if width != self.p:
            raise ValueError(f"gradient has {width} entries, projector expects p={self.p}")
        n = parts[0].shape[0]
        out = torch.zeros(n, self.d, dtype=torch.float64, device=self.device)
        # walk P's row blocks and the chunks together: each product covers their overlap
        br, k, blk, start = self.block_rows, -1, None, 0
        # which chunks hold a nonzero entry: one device sync for all of them, not one per chunk
        nonzero = torch.stack([x.any() for x in parts]).tolist()
        needed, a = [], 0
        for x, keep in zip(parts, nonzero):
            if keep:
                needed += range(a // br, (a + x.shape[-1] - 1) // br + 1)
            a += x.shape[-1]
        self._prefetch(needed)
        for x, keep in zip(parts, nonzero):
            a, stop = start, start + x.shape[-1]
            if not keep:
                start = stop
                continue
            x = x.to(self.device, torch.float64)
            while a < stop:
                if a // br != k:
                    k = a // br
                    blk = self._block64(k)
                b = min(stop, (k + 1) * br)
                out.addmm_(x[:, a - start:b - start], blk[a - k * br:b - k * br])
                a = b
            start = stop
        return out.float()

    def expand(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """x: [d] or [N, d] -> P x: [p] or [N, p] (restores full adapter weights θ* + P x̂)."""
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        squeeze = x.ndim == 1
        x = x.reshape(-1, self.d)
        x = x.double()  # float64 sums, rounded once: identical on any BLAS (see project)
        self._prefetch(range(self.n_blocks))
        parts = [x @ self._block64(k).T for k in range(self.n_blocks)]
        out = (torch.cat(parts, dim=1) / math.sqrt(self.d)).float()
        return out[0] if squeeze else out

    def at_dim(self, d: int) -> "GaussianProjector":
        """The projection at d ≤ self.d: the first d columns of the same Z, scaled by 1/√d
        (its own cache; the blocks it generates are the first d columns of this one's)."""
        if not 0 < d <= self.d:
            raise ValueError(f"projection dimension {d} is not in 1..{self.d}")
        return GaussianProjector(self.p, d, seed=self.seed, block_rows=self.block_rows,
                                 cache_bytes=self.cache_bytes, device=self.device)

    def fingerprint(self) -> dict:
        """Enough to regenerate P anywhere, plus a checksum of its first block."""
        first = self.block(0)[:4].cpu().numpy().tobytes()
        return {"kind": "gaussian-philox/unit-columns", "p": self.p, "d": self.d,
                "seed": self.seed,
                "block_rows": self.block_rows,
                "check": hashlib.sha256(first).hexdigest()[:16]}
