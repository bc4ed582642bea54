/* DolphinFlow's element-wise rule on W lanes: the operations of the reference rule
   (shardflow/optim/dolphinflow.py, dolphinflow_rule), in its order, one rounding each (the
   builder passes -ffp-contract=off: no fused multiply-add), so a kernel that includes this file
   gives the reference's fp32 results. Included by dolphinflow.c (fp32 moments) and quant8.c
   (8-bit moments, dequantized before and requantized after): one rule for both. The
   includer defines the vector type vf and VSET, VADD, VSUB, VMUL, VDIV, VSQRT; the builder
   inlines this file into the source it compiles (shardflow/ops/native/build.py).

   The scalars, as the reference takes them (its `s`, one step of one parameter):
     decay            1 - lr*wd                 (decoupled weight decay)
     one_minus_mu, mu 1 - mu, mu                (the momentum EMA and the Nesterov average)
     beta2, one_minus_beta2                     (the second moment's EMA)
     scale            lr*sqrt(1 - beta2^t)/W    (bias corrections folded in; W: the Nesterov
                                                 average's accumulated weight)
     eps              eps*sqrt(1 - beta2^t)
     c                the clip factor of a raw gradient (no ⊥Grad fold: g' = c*g)
   Direction-only (out given: Newton-Schulz and the trust region need u first): scale and eps
   without lr, decay unused. */

typedef struct {
    float decay, one_minus_mu, mu, beta2, one_minus_beta2, scale, eps, c;
    int32_t nesterov, adaptive;
} DFRule;

typedef struct { vf decay, one_minus_mu, mu, beta2, one_minus_beta2, scale, eps, c; } DFConst;

static inline DFConst df_const(const DFRule* R) {
    DFConst k;
    k.decay = VSET(R->decay); k.one_minus_mu = VSET(R->one_minus_mu); k.mu = VSET(R->mu);
    k.beta2 = VSET(R->beta2); k.one_minus_beta2 = VSET(R->one_minus_beta2);
    k.scale = VSET(R->scale); k.eps = VSET(R->eps); k.c = VSET(R->c);
    return k;
}

/* the gradient the rule sees: a*g - b*w (⊥Grad folded, the clip factor in a and b), or c*g */
static inline __attribute__((always_inline)) vf df_grad(vf g, vf w, vf a, vf b, const DFConst* k,
                                                        const int folded) {
    return folded ? VSUB(VMUL(a, g), VMUL(b, w)) : VMUL(k->c, g);
}

/* the moments m, v in place from the gradient g; returns the direction u */
static inline __attribute__((always_inline)) vf df_direction(vf g, vf* m, vf* v, const DFConst* k,
                                                             const int nesterov, const int adaptive) {
    if (adaptive) *v = VADD(VMUL(k->beta2, *v), VMUL(VMUL(k->one_minus_beta2, g), g));
    *m = VADD(*m, VMUL(k->one_minus_mu, VSUB(g, *m)));
    vf n = nesterov ? VADD(g, VMUL(k->mu, VSUB(*m, g))) : *m;
    vf u = VMUL(k->scale, n);
    return adaptive ? VDIV(u, VADD(VSQRT(*v), k->eps)) : u;
}

/* the weight after the step: w*decay - u */
static inline vf df_apply(vf w, vf u, const DFConst* k) { return VSUB(VMUL(w, k->decay), u); }
