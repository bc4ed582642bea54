"""DolphinFlow's own rules: the RMS rule, the reference maths, routing, clipping, trust region,
dynamic momentum, the loss-aware schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardflow import DolphinFlow, LossAwareSchedule, param_groups

MODES = ["vector", "flat", "block", "matrix", None]


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=24, tied=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 40)
        self.down = nn.Linear(40, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, x):
        h = self.embed(x)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(self.norm(h))


def _mode_kwargs(mode):
    if mode == "flat":
        return {"ortho_mode": "vector", "vector_mode": "flat"}
    return {"ortho_mode": mode, "block_size": 16}


def _random_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 3e-2


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_first_step_update_rms_is_lr_within_the_documented_band(mode, adaptive):
    torch.manual_seed(0)
    model = TinyLM()
    lr = 1e-3
    opt = DolphinFlow(
        model.named_parameters(),
        lr=lr,
        weight_decay=0.0,
        adaptive_lr=adaptive,
        **_mode_kwargs(mode),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _random_grads(model)
    opt.step()
    for name, p in model.named_parameters():
        rms = (p - before[name]).square().mean().sqrt().item() / lr
        assert 0.5 <= rms <= 1.3, f"{name}: first-step update RMS is {rms:.3f}×lr"


def _reference_elementwise(grads, lr, mu, beta2, eps, nesterov, wd, w0):
    """The documented element-wise rule, written out directly in float64."""
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        m = mu * m + (1 - mu) * g
        v = beta2 * v + (1 - beta2) * g * g
        if nesterov:
            n = (mu * m + (1 - mu) * g) / (mu * (1 - mu**t) + (1 - mu))
        else:
            n = m / (1 - mu**t)
        u = n / ((v / (1 - beta2**t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * u
    return w


@pytest.mark.parametrize("nesterov", [True, False])
def test_elementwise_rule_matches_the_written_out_reference(nesterov):
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(6)]
    p = nn.Parameter(w0.clone())
    opt = DolphinFlow(
        [p],
        lr=1e-2,
        weight_decay=0.1,
        momentum=0.8,
        beta2=0.95,
        eps=1e-8,
        nesterov=nesterov,
        ortho_mode=None,
        gradient_clipping=None,
    )
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    expected = _reference_elementwise(grads, 1e-2, 0.8, 0.95, 1e-8, nesterov, 0.1, w0)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_vector_mode_update_is_orthogonal_to_each_weight_row_on_the_first_step():
    w0 = torch.randn(6, 8, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = DolphinFlow([p], lr=1e-2, weight_decay=0.0, adaptive_lr=False, ortho_mode="vector")
    p.grad = torch.randn(6, 8, dtype=torch.float64)
    opt.step()
    delta = p.detach() - w0
    torch.testing.assert_close(
        (delta * w0).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_matrix_mode_update_is_orthogonal_up_to_the_rms_scale():
    p = nn.Parameter(torch.randn(12, 30))
    opt = DolphinFlow(
        [p], lr=1.0, weight_decay=0.0, ortho_mode="matrix", ns_min_steps=8, ns_max_steps=12
    )
    w0 = p.detach().clone()
    p.grad = torch.randn(12, 30)
    opt.step()
    u = (w0 - p.detach()) / (30**0.5)
    s = torch.linalg.svdvals(u.double())
    assert s.min() >= 0.55 and s.max() <= 1.25


def test_default_routing_keeps_embeddings_head_and_1d_params_elementwise():
    model = TinyLM(tied=False)
    opt = DolphinFlow(model.named_parameters(), ortho_mode="matrix")
    routes = {n: opt.route(p, opt.param_groups[0]) for n, p in model.named_parameters()}
    assert routes["up.weight"] == routes["down.weight"] == "matrix"
    for name in ("embed.weight", "lm_head.weight", "up.bias", "norm.weight"):
        assert routes[name] == "elementwise", name


def test_param_groups_helper_finds_tied_embeddings_by_module_type():
    model = TinyLM(tied=True)
    groups = param_groups(model, weight_decay=0.0)
    assert groups[0]["param_names"] == ["up.weight", "down.weight"]
    assert groups[1]["ortho_mode"] is None and groups[1]["weight_decay"] == 0.0
    assert "embed.weight" in groups[1]["param_names"]
    opt = DolphinFlow(groups, ortho_mode="block")
    assert opt.route(model.embed.weight, opt.param_groups[1]) == "elementwise"
    assert opt.route(model.up.weight, opt.param_groups[0]) == "block"


def test_global_clipping_scales_what_the_moments_see():
    a, b = nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))
    opt = DolphinFlow(
        [a, b], momentum=0.9, ortho_mode=None, gradient_clipping=1.0, weight_decay=0.0
    )
    a.grad, b.grad = torch.full((3, 4), 10.0), torch.full((5,), -10.0)
    norm = (12 * 100 + 5 * 100) ** 0.5
    opt.step()
    torch.testing.assert_close(
        opt.state[a]["exp_avg"], torch.full((3, 4), 0.1 * 10.0 / norm), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        opt.state[b]["exp_avg"], torch.full((5,), -0.1 * 10.0 / norm), rtol=1e-5, atol=0
    )


def test_trust_region_bounds_the_step_relative_to_the_weight():
    p = nn.Parameter(torch.full((4, 4), 1e-3))
    opt = DolphinFlow([p], lr=1.0, trust_region=0.1, weight_decay=0.0, ortho_mode=None)
    w0 = p.detach().clone()
    p.grad = torch.randn(4, 4)
    opt.step()
    assert (p.detach() - w0).norm() <= 0.1 * w0.norm() * (1 + 1e-5)


def test_decoupled_weight_decay_alone_shrinks_by_lr_times_wd():
    p = nn.Parameter(torch.ones(3, 3))
    opt = DolphinFlow([p], lr=0.1, weight_decay=0.5, ortho_mode=None)
    p.grad = torch.zeros(3, 3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 3), 1 - 0.1 * 0.5))


def test_dynamic_momentum_rises_with_aligned_gradients_and_stays_in_bounds():
    p = nn.Parameter(torch.randn(4, 6))
    opt = DolphinFlow(
        [p], ortho_mode=None, dynamic_momentum=True, momentum=0.9, momentum_bounds=(0.7, 0.95)
    )
    g = torch.randn(4, 6)
    for _ in range(5):
        p.grad = g.clone()
        opt.step()
    assert float(opt.state[p]["momentum"]) == pytest.approx(0.95)
    for _ in range(10):
        g = -g
        p.grad = g.clone()
        opt.step()
    assert 0.7 <= float(opt.state[p]["momentum"]) < 0.9


def test_bf16_params_keep_fp32_state_and_train():
    model = nn.Linear(16, 8).to(torch.bfloat16)
    opt = DolphinFlow(model.parameters(), lr=1e-2, ortho_mode="matrix")
    x, y = torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(32, 8, dtype=torch.bfloat16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float32
    assert losses[-1] < 0.9 * losses[0]


def test_state_bytes_per_param_is_eight_with_adaptive_lr_and_four_without():
    model = TinyLM(tied=False)
    assert DolphinFlow(model.parameters()).state_bytes_per_param() == 8.0
    assert DolphinFlow(model.parameters(), adaptive_lr=False).state_bytes_per_param() == 4.0


def test_loss_aware_schedule_needs_a_closure():
    p = nn.Parameter(torch.zeros(2))
    opt = DolphinFlow([p], loss_aware_schedule=True)
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"loss_aware_schedule=True needs the loss.*closure"):
        opt.step()


def test_loss_aware_schedule_lowers_the_scale_when_the_loss_stalls():
    p = nn.Parameter(torch.zeros(2))
    opt = DolphinFlow([p], lr=1e-2, loss_aware_schedule=True, ortho_mode=None)
    opt.loss_schedule.patience = 3

    def closure():
        p.grad = torch.ones(2)
        return torch.tensor(1.0)  # a loss that never improves

    for _ in range(4):
        opt.step(closure)
    assert opt.param_groups[0]["lr_scale"] == 0.5


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_loss_aware_schedule_composes_with_a_torch_scheduler():
    p = nn.Parameter(torch.zeros(3))
    opt = DolphinFlow(
        [p], lr=1.0, weight_decay=0.0, ortho_mode=None, adaptive_lr=False, momentum=0.0
    )
    control = LossAwareSchedule(opt, patience=1, factor=0.5, smoothing=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    control.observe(2.0)
    control.observe(2.0)  # stalled once: scale 0.5
    sched.step()  # lr 0.1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[0]["lr_scale"] == 0.5
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.05))  # RMS-1 update × 0.1 × 0.5


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"patience": 0}, r"patience=0 is invalid"),
        ({"factor": 1.5}, r"factor=1\.5 is invalid"),
        ({"min_scale": 0}, r"min_scale=0 is invalid"),
    ],
)
def test_loss_aware_schedule_rejects_bad_settings(kwargs, pattern):
    opt = DolphinFlow([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=pattern):
        LossAwareSchedule(opt, **kwargs)


def test_process_group_none_is_one_process_and_stored():
    opt = DolphinFlow([nn.Parameter(torch.zeros(2))], process_group=None)
    assert opt.process_group is None and opt.placement.world_size == 1


def test_verbose_logs_the_gradient_norm(caplog):
    p = nn.Parameter(torch.zeros(3))
    opt = DolphinFlow([p], verbose=True)
    p.grad = torch.full((3,), 4.0)
    with caplog.at_level("INFO", logger="shardflow"):
        opt.step()
    assert "grad norm 6.928" in caplog.text
