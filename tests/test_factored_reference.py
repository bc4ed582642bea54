"""Direct dense implementations of the update rules FactoredAdam/Adopt/Prodigy follow.

Written from the papers' formulas (and the official codes' conventions named in
``shardflow/optim/factored.py``), independently of it: plain loops over dense float64 tensors.
``factored=True`` replaces each 2-D+ moment, at the end of every step, by its rank-1 NNMF with
the sign kept: ``sign(m)·(Σ_j|m|)(Σ_i|m|)ᵀ/Σ|m|`` — what storing factors and reconstructing them
at the next step computes.
"""

from __future__ import annotations

import math

import torch


def nnmf_rank1(m: torch.Tensor) -> torch.Tensor:
    """``sign(m) · r cᵀ / Σ`` over the ``(out, rest)`` matrix of ``|m|``, written with einsum."""
    mat = m.reshape(m.shape[0], -1)
    mag = mat.abs()
    total = mag.sum()
    if total == 0:
        return torch.zeros_like(m)
    approx = torch.einsum("i,j->ij", mag.sum(1), mag.sum(0)) / total
    sign = torch.where(mat < 0, -1.0, 1.0).to(m.dtype)
    return (sign * approx).reshape(m.shape)


class Reference:
    """One of ``"adam" | "adopt" | "prodigy"`` over a list of dense tensors (updated in place)."""

    def __init__(
        self,
        params,
        kind,
        *,
        lr,
        betas,
        eps,
        weight_decay=0.0,
        factored=False,
        ademamix=False,
        ademamix_beta3=0.9999,
        ademamix_alpha=5.0,
        ademamix_warmup=None,
        atan2=False,
        orthograd=False,
        grams=False,
        clip=True,
        d0=1e-6,
        d_coef=1.0,
        growth_rate=math.inf,
        beta3=None,
        slice_p=11,
    ):
        self.params, self.kind = params, kind
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.factored, self.ademamix = factored, ademamix
        self.b3_final, self.alpha_final, self.warmup = (
            ademamix_beta3,
            ademamix_alpha,
            ademamix_warmup,
        )
        self.atan2, self.orthograd, self.grams, self.clip = atan2, orthograd, grams, clip
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.slow = [torch.zeros_like(p) for p in params]
        self.t = 0
        # Prodigy
        self.d, self.d0, self.d_coef, self.growth = d0, d0, d_coef, growth_rate
        self.beta3 = math.sqrt(self.b2) if beta3 is None else beta3
        self.slice_p, self.r = slice_p, 0.0
        self.p0 = [self._slice(p).clone() for p in params]
        self.s = [torch.zeros_like(x) for x in self.p0]

    def _slice(self, t):
        return t.reshape(t.shape[0], -1)[:, :: self.slice_p] if t.ndim >= 2 else t

    def _schedule(self, t):
        """AdEMAMix (α_t, β₃_t) by the paper's formulas."""
        if self.warmup is None or t >= self.warmup:
            return self.alpha_final, self.b3_final
        a = self.alpha_final * t / self.warmup
        lb, l3 = math.log(self.b1), math.log(self.b3_final)
        x = t / self.warmup
        return a, min(math.exp(lb * l3 / ((1 - x) * l3 + x * lb)), self.b3_final)

    def step(self, grads):
        self.t += 1
        grads = [g.clone() for g in grads]
        if self.orthograd:
            for g, p in zip(grads, self.params):
                gw, ww, gg = (g * p).sum(), (p * p).sum(), (g * g).sum()
                if ww > 0:
                    g -= gw / ww * p
                    g *= torch.sqrt(gg / (g * g).sum())
        getattr(self, "_" + self.kind)(grads)
        if self.factored:
            for states in (self.m, self.v, self.slow):
                for i, p in enumerate(self.params):
                    if p.ndim >= 2:
                        states[i].copy_(nnmf_rank1(states[i]))

    def _apply(self, p, u, g, lr):
        if self.grams:
            u = torch.sign(g) * u.abs()
        p.mul_(1 - lr * self.wd)
        p.sub_(lr * u)

    def _adam(self, grads):
        t = self.t
        alpha, b3 = self._schedule(t)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            num = self.m[i] / (1 - self.b1**t)
            if self.ademamix:
                self.slow[i] = b3 * self.slow[i] + (1 - b3) * g
                num = num + alpha * self.slow[i]
            den = torch.sqrt(self.v[i] / (1 - self.b2**t))
            u = 4 / math.pi * torch.atan2(num, den) if self.atan2 else num / (den + self.eps)
            self._apply(p, u, g, self.lr)

    def _adopt(self, grads):
        t = self.t
        alpha, b3 = self._schedule(t - 1)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if t == 1:
                self.v[i] = g * g
                continue
            if self.atan2:
                n = 4 / math.pi * torch.atan2(g, torch.sqrt(self.v[i]))
            else:
                n = g / torch.clamp(torch.sqrt(self.v[i]), min=self.eps)
                if self.clip:
                    c = (t - 1) ** 0.25
                    n = torch.clamp(n, -c, c)
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * n
            u = self.m[i]
            if self.ademamix:
                self.slow[i] = b3 * self.slow[i] + (1 - b3) * n
                u = u + alpha * self.slow[i]
            self._apply(p, u, g, self.lr)
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g

    def _prodigy(self, grads):
        d, lr, t = self.d, self.lr, self.t
        alpha, b3 = self._schedule(t)
        dot, l1 = 0.0, 0.0
        for i, (p, g) in enumerate(zip(self.params, grads)):
            gs = self._slice(g)
            dot += float((gs * (self.p0[i] - self._slice(p))).sum())
            self.s[i] = self.beta3 * self.s[i] + (d / self.d0) * d * lr * gs
            l1 += float(self.s[i].abs().sum())
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * d * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * d * d * g * g
            num = self.m[i]
            if self.ademamix:
                self.slow[i] = b3 * self.slow[i] + (1 - b3) * d * g
                num = num + alpha * self.slow[i]
            den = torch.sqrt(self.v[i])
            u = 4 / math.pi * torch.atan2(num, den) if self.atan2 else num / (den + d * self.eps)
            self._apply(p, u, g, d * lr)
        self.r = self.beta3 * self.r + (d / self.d0) * d * lr * dot
        if l1 > 0:
            self.d = max(d, min(self.d_coef * self.r / l1, d * self.growth))


def test_nnmf_rank1_keeps_a_signed_rank1_matrix_and_the_total():
    torch.manual_seed(0)
    r, c = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(7, dtype=torch.float64) + 0.1
    signs = torch.where(torch.rand(5, 7) < 0.5, -1.0, 1.0).double()
    m = signs * torch.outer(r, c)
    torch.testing.assert_close(nnmf_rank1(m), m, rtol=1e-12, atol=1e-14)
    noisy = torch.randn(5, 7, dtype=torch.float64)
    assert torch.isclose(nnmf_rank1(noisy).abs().sum(), noisy.abs().sum())
