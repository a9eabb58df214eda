"""FIHS(z) = −⟨v, ∇_θ L(z; θ₀)⟩, optionally cosine-normalized, by three exact methods.

- `brute`: the definition. One backward pass per example, then a float64 dot product with v.
- `hooks`: one batched backward with all weights frozen. For each module that owns scoped parameters,
  ⟨v_m, ∇_m L_b⟩ = Σ_positions ⟨δ_out, J_m v_m⟩, where δ_out is the output gradient of row b and
  J_m v_m the output's tangent along v (for a Linear: x·Vᵀ + v_b; for an Embedding: V[ids]). Rows never
  interact, so one backward of Σ_b L_b gives every row's δ. Weight-gradient GEMMs are never run, and the
  graph starts at the first scoped module. Per-row gradient norms (cosine) use the factored form
  ∇W_b = Σ_n δ_n ⊗ x_n (Gram trick or materialized, whichever is cheaper), with cross terms for tied weights.
- `vmap`: per-example gradients materialized by torch.func.vmap(grad), then dot/norm (memory-heavy).
- `jvp`: forward-mode AD along v gives d/dε L_b(θ₀ + εv) = ⟨∇L_b, v⟩ for all rows at once (dot only).
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradshield_ray.batching import Batch
from gradshield_ray.loss import at_least_fp32 as _f32, per_example_loss

Params = dict[str, torch.nn.Parameter]
Direction = dict[str, torch.Tensor]


def direction_norm(v: Direction) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in v.values()))


def finalize(dots: np.ndarray, sqnorms: np.ndarray | None, v_norm: float) -> np.ndarray:
    """FIHS from ⟨v, ∇L⟩ (and ‖∇L‖² for cosine). The sign: one SGD step on z changes S by
    −η⟨∇S, ∇L(z)⟩, so positive FIHS = training on z raises willingness to comply."""
    fihs = -np.asarray(dots, dtype=np.float64)
    if sqnorms is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            fihs = fihs / (v_norm * np.sqrt(np.asarray(sqnorms, dtype=np.float64)))
    return fihs


# ---------------------------------------------------------------- brute force (the definition)


def brute_force(model, params: Params, v: Direction, batches: list[Batch], cosine: bool
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """(⟨v, ∇L_b⟩, ‖∇L_b‖²) with one backward pass per single-row batch."""
    names, plist = list(params), list(params.values())
    dots, sq = [], []
    for p in plist:
        p.requires_grad_(True)
    try:
        for batch in batches:
            if batch.size != 1:
                raise ValueError("brute force takes single-row batches")
            loss = per_example_loss(model, batch)[0]
            grads = torch.autograd.grad(loss, plist, allow_unused=True)
            d = s = 0.0
            for n, g in zip(names, grads):
                if g is None:
                    continue
                g64 = g.double()
                d += float((g64 * v[n].double()).sum())
                s += float(g64.pow(2).sum())
            dots.append(d)
            sq.append(s)
    finally:
        for p in plist:
            p.requires_grad_(False)
    return np.array(dots), (np.array(sq) if cosine else None)


# ---------------------------------------------------------------- forward-mode JVP


class _LossModule(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return per_example_loss(self.model, batch)


def jvp_dots(model, params: Params, v: Direction, batch: Batch) -> np.ndarray:
    """⟨∇L_b, v⟩ for every row in one forward-mode pass (needs eager attention or the SDPA math kernel)."""
    wrapper = _LossModule(model)
    names = ["model." + n for n in params]
    primals = tuple(p.detach() for p in params.values())
    tangents = tuple(v[n].to(p.dtype) for n, p in params.items())

    def f(*ps):
        return functional_call(wrapper, dict(zip(names, ps)), (batch,))

    _, t = torch.func.jvp(f, primals, tangents)
    return t.double().cpu().numpy()


# ---------------------------------------------------------------- vmap(grad): per-example gradients


def vmap_grad(model, params: Params, v: Direction, batch: Batch, cosine: bool, chunk_size: int | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Materialized per-row gradients (torch.func.vmap over grad), then dot/norm in float64.

    Needs right padding: each row runs alone (batch of one) with no attention mask, and the causal mask
    alone keeps trailing pads from touching real positions; the full-logits loss has no data-dependent
    control flow, which vmap cannot trace. Memory grows with rows × |scope| (chunk_size bounds it)."""
    if bool((batch.attention_mask[:, 0] == 0).any()):
        raise ValueError("the vmap method needs right padding (score.padding_side=right)")
    names = list(params)
    primals = {n: p.detach() for n, p in params.items()}

    def loss(ps, ids, labels):
        # the model's own logits: a causal LM with final_logit_softcapping (Gemma) has already capped them
        # (capping again here was off by 3e-4 of the largest score at cap 5 on a tiny Gemma-3; tests/test_oracle.py)
        logits = functional_call(model, ps, (), {"input_ids": ids[None], "use_cache": False}).logits[0]
        ce = F.cross_entropy(_f32(logits), labels.clamp(min=0), reduction="none")
        m = (labels != -100).to(ce.dtype)
        return (ce * m).sum() / m.sum()

    with torch.enable_grad():
        g = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(primals, batch.input_ids, batch.labels)
    dots = sum((g[n].double() * v[n].double()).flatten(1).sum(1) for n in names)
    sq = sum(g[n].double().pow(2).flatten(1).sum(1) for n in names) if cosine else None
    return dots.cpu().numpy(), (sq.cpu().numpy() if cosine else None)


# ---------------------------------------------------------------- low-rank factors of v


class LinearFactorCapture:
    """Records v's exact low-rank factors for Linear weights while v = ∇S is computed.

    v_W = Σ_k δ_k x_kᵀ over the probe positions k (δ: the output gradient of S, x: the layer input), so
    V = Aᵀ B with A = [δ_k] (K × out) and B = [x_k] (K × in). The per-row contraction ⟨δ, V x⟩ then
    costs K·(out + in) per token instead of out·in: a large saving for wide layers and few probe tokens,
    with no approximation. Only weights used by one module are captured (tied weights stay dense)."""

    def __init__(self, model, params: Params):
        pids = {id(p) for p in params.values()}
        counts = Counter(id(p) for _, m in model.named_modules() for p in m.parameters(recurse=False))
        self.modules = [m for _, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        and id(m.weight) in pids and counts[id(m.weight)] == 1]
        self.factors: dict[int, tuple[list, list]] = {id(m.weight): ([], []) for m in self.modules}

    def __enter__(self) -> "LinearFactorCapture":
        def fwd(mod, args, out):
            if not out.requires_grad:
                return
            x = args[0].detach().reshape(-1, mod.in_features).float()
            a_list, b_list = self.factors[id(mod.weight)]

            def tap(g):
                g2 = g.detach().reshape(-1, mod.out_features).float()
                keep = g2.abs().amax(1) > 0  # rows with no gradient contribute nothing
                a_list.append(g2[keep])
                b_list.append(x[keep])

            out.register_hook(tap)

        self._handles = [m.register_forward_hook(fwd) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def result(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """param id → (A [K, out], B [K, in]) with v_W = Aᵀ B."""
        return {pid: (torch.cat(a), torch.cat(b)) for pid, (a, b) in self.factors.items() if a}


# ---------------------------------------------------------------- per-layer hooks


@dataclass
class _Dense:
    """∇W_b = Σ_n left[b,n] ⊗ right[b,n] (right=None means a bias: right = 1)."""
    left: torch.Tensor  # [B, N, a]
    right: torch.Tensor | None  # [B, N, c]


@dataclass
class _OneHot:
    """∇W_b = Σ_n e_{ids[b,n]} ⊗ right[b,n] (an embedding table's gradient)."""
    ids: torch.Tensor  # [B, N]
    right: torch.Tensor  # [B, N, c]
    rows: int


@dataclass
class _Full:
    """Materialized per-row gradients [B, *param.shape]."""
    g: torch.Tensor


def _gram(a: torch.Tensor | None, b: torch.Tensor | None, B: int, n1: int, n2: int) -> torch.Tensor:
    if a is None or b is None:
        ref = a if a is not None else b
        dev = ref.device if ref is not None else None
        return torch.ones(B, n1, n2, device=dev)
    return torch.bmm(a, b.transpose(1, 2))


def _materialize(f) -> torch.Tensor:
    if isinstance(f, _Full):
        return f.g.flatten(1)
    if isinstance(f, _Dense):
        if f.right is None:
            return f.left.sum(1)
        return torch.bmm(f.left.transpose(1, 2), f.right).flatten(1)
    B, _, c = f.right.shape
    out = torch.zeros(B, f.rows, c, dtype=f.right.dtype, device=f.right.device)
    out.scatter_add_(1, f.ids.unsqueeze(-1).expand(-1, -1, c), f.right)
    return out.flatten(1)


def _inner(f1, f2) -> torch.Tensor:
    """[B] ⟨∇W_b from use 1, ∇W_b from use 2⟩ without materializing when the factors allow."""
    if isinstance(f1, _Full) or isinstance(f2, _Full):
        return (_materialize(f1) * _materialize(f2)).sum(1)
    if isinstance(f1, _Dense) and isinstance(f2, _OneHot):
        f1, f2 = f2, f1
    B, n1 = f1.right.shape[:2] if isinstance(f1, _OneHot) else f1.left.shape[:2]
    n2 = f2.right.shape[1] if isinstance(f2, _OneHot) else f2.left.shape[1]
    rgram = _gram(f1.right, f2.right, B, n1, n2)
    if isinstance(f1, _OneHot) and isinstance(f2, _OneHot):
        lgram = (f1.ids.unsqueeze(2) == f2.ids.unsqueeze(1)).to(rgram.dtype)
    elif isinstance(f1, _OneHot):  # lgram[n1, n2] = f2.left[n2, ids[n1]]
        lgram = f2.left.gather(2, f1.ids.unsqueeze(1).expand(-1, n2, -1)).transpose(1, 2)
    else:
        lgram = _gram(f1.left, f2.left, B, n1, n2)
    return (lgram * rgram).sum((1, 2))


def _self_sqnorm(f) -> torch.Tensor:
    """[B] ‖∇W_b‖², picking the Gram trick (cost N²(a+c)) or materializing (cost N·a·c)."""
    if isinstance(f, _Dense) and f.right is not None:
        n, a, c = f.left.shape[1], f.left.shape[2], f.right.shape[2]
        if n * (a + c) > a * c:
            return _materialize(f).pow(2).sum(1)
    return _inner(f, f)


def _embedding_scale(mod: torch.nn.Embedding) -> float | None:
    """The constant s with mod(ids) = s · W[ids], or None when the forward is not known to have that form
    (the module then goes through the generic vmap path, which is exact for any forward). nn.Embedding has
    s = 1; Gemma's scaled embeddings multiply by embed_scale, rounded to the weight's dtype as they do."""
    if type(mod).forward is torch.nn.Embedding.forward:
        return 1.0
    scale = getattr(mod, "embed_scale", None)
    if type(mod).__name__.endswith("ScaledWordEmbedding") and scale is not None:
        return float(torch.as_tensor(scale).to(mod.weight.dtype))
    return None


SPARSE_ROWS = 0.25  # contract over v's nonzero rows when at most this share of a weight's rows are nonzero


class HookScorer:
    """Batched exact FIHS through module hooks; one instance per model, reused across batches."""

    def __init__(self, model, params: Params, v: Direction, cosine: bool,
                 factors: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, use_factors: str = "auto"):
        self.model, self.cosine = model, cosine
        self.v = {id(p): v[n] for n, p in params.items()}
        self.factors = factors or {}
        self.use_factors = use_factors
        self._casts: dict = {}
        self.targets: list[tuple[torch.nn.Module, list[tuple[str, torch.nn.Parameter]]]] = []
        for _, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in self.v]
            if own:
                self.targets.append((module, own))
        # forward calls per parameter in this batch: a tied matrix is used twice, and the chunked LM head
        # (loss.per_example_loss) calls the head once per chunk; calls made while the backward recomputes
        # a checkpointed chunk are not uses (their outputs get no gradient)
        self.uses: Counter[int] = Counter()
        self._in_backward = False
        self._dots: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None
        self._pending: dict[int, list] = {}
        self._deferred: list = []

    # -- accumulation, called from backward tensor hooks only (so recomputed forwards never double-count)
    def _add_dot(self, per_row: torch.Tensor) -> None:
        self._dots += per_row.double()

    def _add_factor(self, p: torch.nn.Parameter, f) -> None:
        if self.uses[id(p)] == 1:
            self._sq += _self_sqnorm(f).double()
        else:
            self._pending.setdefault(id(p), []).append(f)

    def _hook(self, module, own):
        names = {n: p for n, p in own}

        def fwd(mod, args, kwargs, out):
            if not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
                if torch.is_grad_enabled():
                    raise TypeError(f"hooks method: {type(mod).__name__} returns {type(out).__name__}, "
                                    "not a tensor; use score.method=brute or jvp")
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            B = out.shape[0]
            if not self._in_backward:
                self.uses.update(id(p) for p in names.values())
            if not out.requires_grad:  # nothing scoped upstream: the graph starts here
                out = out.detach().requires_grad_(True)
            if isinstance(mod, torch.nn.Linear):
                tap = self._linear(mod, names, x, B)
            elif isinstance(mod, torch.nn.Embedding) and (scale := _embedding_scale(mod)) is not None:
                tap = self._embedding(mod, names, x, B, scale)
            else:
                tap = self._generic(mod, own, args, kwargs, B)
            out.register_hook(tap)
            return out

        return module.register_forward_hook(fwd, with_kwargs=True)

    def _cast(self, key, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """v (or its factors) in the activations' dtype, converted once per dtype, not per call."""
        k = (key, dtype)
        if k not in self._casts:
            self._casts[k] = t.to(dtype)
        return self._casts[k]

    def _linear(self, mod, names, x, B):
        """GEMMs run in the activations' dtype (bf16 on GPUs, fp32 accumulation inside); the per-token
        dot products and the per-row sums in fp32 / fp64."""
        w, b = names.get("weight"), names.get("bias")
        x2 = x.detach().reshape(B, -1, x.shape[-1])
        dt = x2.dtype
        Vb = self._cast(id(b), self.v[id(b)], dt) if b is not None else None
        rows = self._sparse_rows(w) if w is not None else None
        fac = self.factors.get(id(w)) if w is not None else None
        if fac is not None and not self.cosine:
            K = fac[0].shape[0]
            cost = K * (mod.in_features + mod.out_features)
            cheaper = cost < min(mod.in_features * mod.out_features,
                                 math.inf if rows is None else rows.numel() * mod.in_features)
            fac = fac if (self.use_factors == "always" or (self.use_factors == "auto" and cheaper)) else None
        else:
            fac = None
        rows = None if fac is not None else rows
        Vw = self._cast(id(w), self.v[id(w)], dt) if (w is not None and fac is None and rows is None) else None
        if fac is not None:  # ⟨g, (AᵀB) x⟩ = ⟨g Aᵀ, x Bᵀ⟩: keep only x Bᵀ ([N, K]) until backward
            A, Bf = self._cast(("A", id(w)), fac[0], dt), self._cast(("B", id(w)), fac[1], dt)
            xb, u = x2 @ Bf.T, None
        elif rows is not None:  # ⟨g, V x⟩ over V's nonzero rows only: u = x V[rows]ᵀ, [N, r]
            u = F.linear(x2, self._cast(("rows", id(w)), self.v[id(w)][rows], dt))
        else:
            # keep whichever is smaller alive until backward: x (then ⟨g·V, x⟩) or u = x·Vᵀ (then ⟨g, u⟩)
            u = F.linear(x2, Vw) if (Vw is not None and mod.out_features < mod.in_features) else None

        def tap(g):
            g2 = g.reshape(B, -1, g.shape[-1])
            per = torch.zeros(B, dtype=torch.float64, device=g.device)
            if fac is not None:
                per = per + torch.linalg.vecdot(_f32(g2 @ A.T), _f32(xb)).double().sum(1)
            elif rows is not None:
                per = per + torch.linalg.vecdot(_f32(g2.index_select(-1, rows)), _f32(u)).double().sum(1)
            elif Vw is not None:
                per = per + (torch.linalg.vecdot(_f32(g2), _f32(u)) if u is not None else
                             torch.linalg.vecdot(_f32(g2 @ Vw), _f32(x2))).double().sum(1)
            if Vb is not None:
                per = per + (_f32(g2) @ _f32(Vb)).double().sum(1)
            self._add_dot(per)
            if self.cosine:
                if w is not None:
                    self._add_factor(w, _Dense(_f32(g2), _f32(x2)))
                if b is not None:
                    self._add_factor(b, _Dense(_f32(g2), None))

        return tap

    def _sparse_rows(self, w: torch.nn.Parameter) -> torch.Tensor | None:
        """Indices of v's nonzero rows for this weight when they are at most SPARSE_ROWS of them, else None.
        Why: v = ∇S only reaches an LM head through the comply and refuse logits, so an untied head's v has
        2 nonzero rows, and a tied embedding/head matrix's v only the rows of the probes' tokens (a few
        hundred of a 32k–262k vocabulary). Contracting over those rows is exact and skips a vocab-sized
        GEMM per scored position."""
        key = ("rows?", id(w))
        if key not in self._casts:
            nz = torch.nonzero(self.v[id(w)].abs().amax(dim=1)).squeeze(1)
            self._casts[key] = nz if nz.numel() <= SPARSE_ROWS * self.v[id(w)].shape[0] else None
        return self._casts[key]

    def _embedding(self, mod, names, ids, B, scale: float):
        """out = scale · W[ids] (scale 1 for nn.Embedding, embed_scale for Gemma's scaled embedding)."""
        w = names["weight"]
        ids2 = ids.reshape(B, -1)
        keep = None if mod.padding_idx is None else (ids2 != mod.padding_idx)  # padding row gets no gradient

        def tap(g):
            g2 = _f32(g).reshape(B, ids2.shape[1], -1)
            if keep is not None:
                g2 = g2 * keep.unsqueeze(-1)
            if scale != 1.0:
                g2 = g2 * scale
            V = self._cast(id(w), self.v[id(w)], g2.dtype)
            self._add_dot(torch.linalg.vecdot(g2, F.embedding(ids2, V)).double().sum(1))
            if self.cosine:
                self._add_factor(w, _OneHot(ids2, g2, mod.num_embeddings))

        return tap

    def _generic(self, mod, own, args, kwargs, B):
        """Any other module (norm layers, custom ops): per-row parameter gradients by vmap(grad)."""
        params = {n: p.detach() for n, p in own}
        targs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        vmap_dims = tuple(0 if isinstance(a, torch.Tensor) and a.shape[:1] == (B,) else None for a in targs)

        def contract(p, g_row, *a_row):
            a = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(a_row, vmap_dims))
            out = functional_call(mod, p, a, kwargs)
            return (out * g_row.unsqueeze(0)).sum()

        def run(g):
            grads = vmap(grad(contract), in_dims=(None, 0, *vmap_dims))(params, g, *targs)
            per = torch.zeros(B, dtype=torch.float64, device=g.device)
            for n, p in own:
                gb = grads[n]
                per = per + (gb.double() * self.v[id(p)].double()).flatten(1).sum(1)
                if self.cosine:
                    self._add_factor(p, _Full(_f32(gb)))
            self._add_dot(per)

        def tap(g):  # functorch cannot run inside the autograd engine: finish after backward
            self._deferred.append(lambda: run(g.detach()))

        return tap

    @contextlib.contextmanager
    def attached(self):
        handles = [self._hook(m, own) for m, own in self.targets]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def __call__(self, batch: Batch) -> tuple[np.ndarray, np.ndarray | None]:
        dev = batch.input_ids.device
        self._dots = torch.zeros(batch.size, dtype=torch.float64, device=dev)
        self._sq = torch.zeros(batch.size, dtype=torch.float64, device=dev)
        self._pending, self._deferred = {}, []
        self.uses.clear()
        with self.attached(), torch.enable_grad():
            loss = per_example_loss(self.model, batch)
            if not loss.requires_grad:
                raise RuntimeError("no scoped parameter influences the loss")
            self._in_backward = True
            try:
                loss.sum().backward()
            finally:
                self._in_backward = False
        for job in self._deferred:
            job()
        self._deferred = []
        for facs in self._pending.values():  # tied weights: ‖Σ_u ∇_u‖² with cross terms
            for i, fi in enumerate(facs):
                for j, fj in enumerate(facs[i:], start=i):
                    self._sq += (1.0 if i == j else 2.0) * _inner(fi, fj).double()
        self._pending = {}
        dots = self._dots.cpu().numpy()
        return dots, (self._sq.cpu().numpy() if self.cosine else None)
