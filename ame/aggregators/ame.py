"""AME, one family: soup, weighted soup and every AME variant.

The model soup and every AME variant are one aggregator, :class:`AME`: an ordinary ``torch.optim``
optimizer run over the experts with the pseudogradient of f_i(w) = ½‖w − x_i‖². Plain gradient
descent with step 1/k over one epoch is the soup, from any pivot.

It streams: the model is cut into chunks (:meth:`ame.pool.ExpertPool.chunks`); for each chunk the
iterate, the pseudogradient, the pivot and the optimizer's state exist for that chunk only, and
the experts are visited in the same seeded order for every chunk. Element-wise optimizers (all of
``torch.optim`` but LBFGS) make this exactly the whole-model computation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Mapping

import torch
from torch import Tensor

from ame.aggregators.base import Aggregator, Callback, aborting, average_chunk, chunk_bytes
from ame.io import Output
from ame.device import resolve_device
from ame.errors import AMEError, require
from ame.pool import INIT, ExpertPool
from ame.progress import progress

PIVOTS = ("init", "soup", "zero", "first")
PSEUDOGRADIENTS = ("iterate", "pivot")
ORDERS = ("fixed", "shuffle")
LR_SCHEDULES = ("constant", "harmonic")
HOLD_BYTES = 256 << 20  # an expert's slices read once and kept for a second use (pivot=soup, epochs > 1), all N
KEEP_BYTES = 512 << 20  # on the CPU: the N experts' slices of a chunk kept as float32 (read and converted once)


def _step(opt: torch.optim.Optimizer) -> None:
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 — LBFGS (needs a closure over data), SparseAdam (sparse grads only), ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AMEError(f"aggregator.optimizer: {type(opt).__name__}.step() cannot take a dense pseudogradient "
                       f"({first}); AME needs an optimizer that steps on a given dense gradient, such as SGD, "
                       "Adam or Adagrad") from None


class AME(Aggregator):
    """Amortized Model Ensembling: feed per-expert pseudogradients to a torch.optim optimizer.

    Args:
        optimizer: a ``torch.optim.Optimizer`` class with its hyperparameters bound
            (Hydra ``_partial_: true``), called as ``optimizer([w])``.
        epochs: ensembling epochs (passes over the experts).
        pivot: starting point and reference: the shared ``init``, the ``soup``, ``zero`` or the
            ``first`` expert.
        pseudogradient: ``iterate`` g_i = ζ_i (w − x_i); ``pivot`` g_i = ζ_i (x_pivot − x_i) / N.
        amplification: ζ, a number, or ``shard_size`` for ζ_i = N n_i / Σ n (weights by shard size).
        order: ``fixed`` (expert 0, 1, ...) or ``shuffle`` (a new seeded permutation each epoch).
        lr_schedule: ``constant``, or ``harmonic``: step k (counted over all epochs) uses lr / k.
        seed: seeds ``order=shuffle``.
        name: the variant's name in results (``soup``, ``ame_adam``, ...).
        device: where the chunk's iterate and optimizer state live (``cpu``, ``cuda``, ``auto``).
        chunk_mb: the chunk size in MB of float32 (memory is about 5× this plus one slice per expert).

    Optional distance trace (for watching a run, e.g. curves in W&B): pass ``callbacks`` to
    :meth:`run` (:class:`~ame.aggregators.base.Callback`); after the run each one's ``on_step`` is
    called for step 0 (the pivot) and every ``every`` steps (and the last), with the iterate's
    distances over the parameters
    (``dist_soup_l2``, ``dist_pivot_l2``, and relative to ‖pivot − soup‖ ``dist_soup``,
    ``dist_pivot``, as in ``results.json``). Streaming makes them sums over chunks, so they arrive
    when the run ends. Unset (the default), it costs nothing.
    """

    init_reason = " (pivot=init)"
    other_ways = "use aggregator.pivot=soup|first|zero"

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], epochs: int = 1, pivot: str = "init",
                 pseudogradient: str = "iterate", amplification: float | str = 1.0, order: str = "fixed",
                 lr_schedule: str = "constant", seed: int = 0, name: str = "ame", device: str = "cpu",
                 chunk_mb: float = 16):
        super().__init__()
        require(pivot in PIVOTS, f"aggregator.pivot must be one of {PIVOTS}, got {pivot!r}")
        require(pseudogradient in PSEUDOGRADIENTS,
                f"aggregator.pseudogradient must be one of {PSEUDOGRADIENTS}, got {pseudogradient!r}")
        require(order in ORDERS, f"aggregator.order must be one of {ORDERS}, got {order!r}")
        require(lr_schedule in LR_SCHEDULES, f"aggregator.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        require(isinstance(epochs, int) and epochs >= 1, f"aggregator.epochs must be an integer ≥ 1, got {epochs!r}")
        require(amplification == "shard_size" or (isinstance(amplification, (int, float))
                                                  and math.isfinite(amplification) and amplification > 0),
                f"aggregator.amplification must be a positive number or 'shard_size', got {amplification!r}")
        self.optimizer, self.epochs, self.pivot_kind = optimizer, epochs, pivot
        self.pseudogradient, self.amplification, self.order = pseudogradient, amplification, order
        self.lr_schedule, self.seed, self.name, self.device = lr_schedule, seed, name, device
        self.chunk_bytes = chunk_bytes(chunk_mb)
        self._kwargs: dict | None = None

    @property
    def needs_init(self) -> bool:
        return self.pivot_kind == "init"

    def check(self) -> None:
        """Fail now, before any expert is trained, if the optimizer or the device cannot work:
        one step of the optimizer on a dummy parameter."""
        resolve_device(self.device, "aggregator.device")
        w = torch.nn.Parameter(torch.zeros(1))
        w.grad = torch.zeros(1)
        _step(self._optimizer(w))

    def _optimizer(self, w: torch.nn.Parameter) -> torch.optim.Optimizer:
        """``optimizer([w])`` on its fastest implementation: fused where torch has it (SGD, Adam,
        AdamW, Adagrad), else foreach; an explicit ``fused``/``foreach`` setting is kept."""
        if self._kwargs is not None:
            return self.optimizer([w], **self._kwargs)
        chosen = getattr(self.optimizer, "keywords", {}) or {}
        tries = [{}] if {"fused", "foreach"} & set(chosen) else [{"fused": True}, {"foreach": True}, {}]
        for i, kwargs in enumerate(tries):
            try:
                opt = self.optimizer([w], **kwargs)
                self._kwargs = kwargs if w.device.type == "cpu" else None
                return opt
            except Exception as e:  # noqa: BLE001 — whatever the optimizer raises on its settings: one line
                if i == len(tries) - 1:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise AMEError(f"aggregator.optimizer: {first}; use a torch.optim optimizer such as SGD, "
                                   "Adam or Adagrad with valid settings") from None
        raise AssertionError("unreachable")

    def _zeta(self, sizes: Sequence[float], n: int) -> list[float]:
        if self.amplification == "shard_size":
            return [n * s / sum(sizes) for s in sizes]
        return [float(self.amplification)] * n

    def _orders(self, n: int) -> list[list[int]]:
        """The expert order of every epoch: drawn once, the same for every chunk."""
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.randperm(n, generator=gen).tolist() if self.order == "shuffle" else list(range(n))
                for _ in range(self.epochs)]

    def _pivot_chunk(self, pool: ExpertPool, chunk, out: Tensor, acc: dict, read=None) -> Tensor:
        """The pivot's slice of ``chunk`` as float32, in ``out`` (or, for the soup of 16-bit experts, in
        the pool's workspace that holds it already); ``read(i)``: expert i's slice."""
        if self.pivot_kind == "init":
            return pool.read(INIT, chunk, out=out)
        if self.pivot_kind == "first":
            return out.copy_(read(0)) if read is not None else pool.read(0, chunk, out=out)
        if self.pivot_kind == "soup":
            if "soup" not in acc:
                acc["soup"] = torch.empty(acc["pivot"].numel(), dtype=torch.float64)
            soup = average_chunk(pool, chunk, [1.0] * pool.n, out=acc["soup"], read=read)
            return soup if soup.dtype == out.dtype else out.copy_(soup)  # float32 already: the pool's workspace
        return out.zero_()

    def pivot(self, pool: ExpertPool) -> dict[str, Tensor] | None:
        if self.pivot_kind == "soup":
            return None
        if self.pivot_kind == "zero":
            return {k: torch.zeros(shape, dtype=d) for k, (shape, d) in pool.infos.items()}
        return pool.whole(INIT if self.pivot_kind == "init" else 0)

    def run(self, pool: ExpertPool, out: Output | None = None, callbacks: Sequence[Callback] = (),
            score=None) -> Mapping[str, Tensor]:
        n = pool.n
        out = self._begin(pool, out, integers_from=INIT if self.pivot_kind == "init" else 0)
        device = resolve_device(self.device, "aggregator.device")
        on_gpu = device.type == "cuda"
        zeta = self._zeta(pool.sizes, n)
        orders = self._orders(n)
        keep = not on_gpu and (self.pivot_kind == "soup" or self.epochs > 1)
        chunks = pool.chunks(self._chunk_bytes(pool, keep))
        size = max(c.numel for c in chunks)
        # workspaces reused from chunk to chunk (fresh pages cost a fault each): the pivot, the
        # iterate, the pseudogradient (and the CUDA staging buffers, and the soup's accumulator)
        work = {"pivot": torch.empty(size, device=device), "w": torch.empty(size, device=device),
                "g": torch.empty(size, device=device)}
        if on_gpu:
            work |= {"staging": torch.empty(size, pin_memory=True), "x": torch.empty(size, device=device)}
        if keep:  # every expert's slice, read and converted once per chunk, for the soup and every step
            work["kept"] = torch.empty(n, size)
        total = self.epochs * n
        # each callback's steps (None: about 32 points, so the two distances, one pass each, stay a small cost)
        everies = {id(cb): max(1, int(cb.every) if cb.every else math.ceil(total / 32)) for cb in callbacks}
        wanted = {s for cb in callbacks for s in range(total + 1) if s % everies[id(cb)] == 0 or s == total}
        trace = {s: [0.0, 0.0] for s in sorted(wanted)} if callbacks else None
        with aborting(out):  # nothing half-written is left on any error
            with pool.ahead(step for c in chunks for step in self._reads(pool, c, orders, trace is not None, keep)):
                for chunk in progress(chunks, f"{self.name} chunks") if len(chunks) > 1 else chunks:
                    w = self._chunk(pool, chunk, zeta, orders, device, on_gpu, work, trace)
                    self._finish_chunk(pool, chunk, w, out, "the aggregate has NaN/Inf weights: the AME optimizer "
                                       "diverged; lower aggregator.optimizer.lr")
        if trace is not None:
            scale = math.sqrt(trace[0][0])
            for step, (soup2, pivot2) in trace.items():
                m = {"dist_soup_l2": math.sqrt(soup2), "dist_pivot_l2": math.sqrt(pivot2)}
                if scale > 0:
                    m |= {"dist_soup": m["dist_soup_l2"] / scale, "dist_pivot": m["dist_pivot_l2"] / scale}
                for cb in callbacks:
                    if step % everies[id(cb)] == 0 or step == total:
                        cb.on_step(self, step, m)
        return self._end(out)

    def _chunk_bytes(self, pool: ExpertPool, keep: bool) -> int:
        """The chunk size: ``chunk_mb``, made smaller when every expert's slice of a chunk is used
        more than once (pivot=soup, several epochs) so that the N slices stay within KEEP_BYTES as
        float32 (``keep``: on the CPU) or HOLD_BYTES as read (on a GPU, read once and kept raw)."""
        if self.pivot_kind != "soup" and self.epochs == 1:
            return self.chunk_bytes
        if keep:
            return min(self.chunk_bytes, max(1 << 20, KEEP_BYTES // pool.n))
        itemsize = max((d.itemsize for _, d in pool.infos.values() if d.is_floating_point), default=4)
        return min(self.chunk_bytes, max(1 << 20, 4 * HOLD_BYTES // (pool.n * itemsize)))

    def _reads(self, pool: ExpertPool, chunk, orders: list[list[int]], traced: bool,
               keep: bool = False) -> list[tuple[int, object]]:
        """The slices :meth:`_chunk` reads for ``chunk``, in order (the read-ahead's plan); with
        ``keep``, each expert's only at its first use."""
        pivot = {"init": [INIT], "first": [0], "soup": list(range(pool.n)), "zero": []}[self.pivot_kind]
        soup = list(range(pool.n)) if traced and self.pivot_kind != "soup" else []
        reads = pivot + soup + [i for order in orders for i in order]
        if keep:
            seen: set = set()
            reads = [i for i in reads if i == INIT or not (i in seen or seen.add(i))]
        return [(i, chunk) for i in reads]

    @staticmethod
    def _traced(pool: ExpertPool, chunk, w: Tensor, pivot: Tensor, soup: Tensor, into: list[float]) -> None:
        """Add the chunk's squared distances of ``w`` to the soup and to the pivot (parameters only) to ``into``."""
        for p in chunk.pieces:
            if p.key in pool.params:
                into[0] += float((w[p.lo:p.hi] - soup[p.lo:p.hi]).double().square().sum())
                into[1] += float((w[p.lo:p.hi] - pivot[p.lo:p.hi]).double().square().sum())

    def _chunk(self, pool: ExpertPool, chunk, zeta: list[float], orders: list[list[int]], device: torch.device,
               on_gpu: bool, work: dict, trace: dict | None = None) -> Tensor:
        """One chunk's AME: the iterate after every step over the experts, as float32."""
        # The iterate and the pseudogradient are flat float32 buffers of this chunk: an AME step is
        # one pass writing g = w − x_i (or x_pivot − x_i) straight from the expert's slices (views
        # of its file), and one fused optimizer kernel. On CUDA the slice is staged through pinned
        # memory and copied once.
        n = chunk.numel
        read = _keeper(pool, chunk, work["kept"][:, :n]) if "kept" in work else None
        if on_gpu:
            pivot = work["pivot"][:n].copy_(self._pivot_chunk(pool, chunk, torch.empty(n), work))
            staging, x = work["staging"][:n], work["x"][:n]
        else:
            pivot = self._pivot_chunk(pool, chunk, work["pivot"][:n], work, read)
        if self.pseudogradient == "iterate" and trace is None and not on_gpu and pivot.data_ptr() != work["pivot"].data_ptr():
            w = torch.nn.Parameter(pivot)  # the soup's workspace, not needed again in this chunk: no copy
        else:
            w = torch.nn.Parameter(work["w"][:n].copy_(pivot))
        g = work["g"][:n]
        w.grad = g
        opt = self._optimizer(w)
        base_lr = [group["lr"] for group in opt.param_groups]
        step = 0
        if trace is not None:
            soup = pivot if self.pivot_kind == "soup" else \
                average_chunk(pool, chunk, [1.0] * pool.n, read=read).to(device, torch.float32)
            self._traced(pool, chunk, w.detach(), pivot, soup, trace[0])
        for order in orders:
            for i in order:
                ref = w.detach() if self.pseudogradient == "iterate" else pivot
                if on_gpu:
                    x.copy_(pool.read(i, chunk, out=staging), non_blocking=True)
                    torch.sub(ref, x, out=g)
                elif read is not None:
                    torch.sub(ref, read(i), out=g)
                else:  # one slice read (converted to float32 in one pass), one subtraction
                    torch.sub(ref, pool.read(i, chunk, out=pool.buffer("x32", n), view=True), out=g)
                if self.pseudogradient == "pivot":
                    g.div_(pool.n)
                if zeta[i] != 1.0:
                    g.mul_(zeta[i])
                step += 1
                if self.lr_schedule == "harmonic":
                    for group, lr in zip(opt.param_groups, base_lr):
                        group["lr"] = lr / step
                _step(opt)
                if on_gpu:
                    torch.cuda.current_stream().synchronize()  # before the staging buffer is refilled
                if trace is not None and step in trace:
                    self._traced(pool, chunk, w.detach(), pivot, soup, trace[step])
        return w.detach()


def _keeper(pool: ExpertPool, chunk, kept: Tensor) -> Callable[[int], Tensor]:
    """``read(i)``: expert i's float32 slice of ``chunk``, read and converted at its first use, then
    kept in row i of ``kept``."""
    have: set[int] = set()

    def read(i: int) -> Tensor:
        if i not in have:
            pool.read(i, chunk, out=kept[i])
            have.add(i)
        return kept[i]
    return read


def average(experts, weights: Sequence[float] | None = None, buffers=None, **pool_kwargs) -> dict[str, Tensor]:
    """The (weighted) model soup of ``experts`` (an :class:`ExpertPool`, or what it takes), in float64
    one expert at a time; integer entries from the first expert."""
    pool = experts if isinstance(experts, ExpertPool) else ExpertPool(experts, buffers=buffers, **pool_kwargs)
    return dict(Soup(weights).run(pool))


class Soup(Aggregator):
    """The model soup: the plain (or weighted) average Σ w_i x_i / Σ w_i, computed directly.

    The sum is accumulated in float32 when the experts are 16-bit (bf16/fp16 values are exact in
    float32, so N of them add up to within N float32 roundings, far below the output's 16-bit ulp)
    and in float64 otherwise; then divided once. (AME-GD with step 1/k, ``aggregator=ame_sgd``,
    gives the same average through the optimizer; the tests hold them to 1e-6.)

    Args:
        weights: one non-negative weight per expert, or ``shard_size`` (w_i = n_i, the weighted
            soup); None: equal weights.
        name: the name in results.
        chunk_mb: the chunk size in MB of float32.
    """

    name = "soup"

    def __init__(self, weights: Sequence[float] | str | None = None, name: str = "soup", chunk_mb: float = 64):
        super().__init__()
        require(weights is None or weights == "shard_size" or (isinstance(weights, Sequence) and not
                isinstance(weights, str)), f"aggregator.weights must be a list of numbers, shard_size or null, "
                f"got {weights!r}")
        self.weights, self.name, self.chunk_bytes = weights, name, chunk_bytes(chunk_mb)

    def run(self, pool: ExpertPool, out: Output | None = None, callbacks: Sequence[Callback] = (),
            score=None) -> Mapping[str, Tensor]:
        weights = (list(map(float, pool.sizes)) if self.weights == "shard_size" else [1.0] * pool.n
                   if self.weights is None else [float(w) for w in self.weights])
        require(len(weights) == pool.n and all(w >= 0 for w in weights) and sum(weights) > 0,
                f"need {pool.n} non-negative weights with a positive sum, got {weights}")
        out = self._begin(pool, out)
        chunks = pool.chunks(self.chunk_bytes)
        with aborting(out):  # nothing half-written is left on any error
            with pool.ahead((i, c) for c in chunks for i in range(pool.n)):
                for chunk in progress(chunks, f"{self.name} chunks") if len(chunks) > 1 else chunks:
                    self._finish_chunk(pool, chunk, average_chunk(pool, chunk, weights), out)
        return self._end(out)
