"""Multilinear jets (curvrate_fast/jets/multilinear.py): one pass along x + Σ ε_i·u_i (ε_i² = 0)
gives the mixed derivatives Dⁿℓ[u_1, …, u_n] that a per-order CRR penalty needs. Checked against
nested autograd (the notebooks' loop, float64) for every op family with a multilinear rule and
N = 1..4; the per-order penalty through it against the polarization pass (the same values and
gradients, ≤ 1e-12); ops without a rule are refused inside a pass and send the penalty to
polarization, with the probe leaving random state, buffers and the model's forward count as they
were; and the probe is made once per configuration."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _curv_oracle import nested_mixed
from _oracle import rel_err
from models import MnistCNN

import curvrate_fast as cf
from curvrate_fast import crr as crr_mod
from curvrate_fast.baseline import primitive_ops
from curvrate_fast.jets import multilinear as ML

D64 = torch.float64


def _components(model, x, y, us, loss_fn=None):
    loss = loss_fn or (lambda z, t: F.cross_entropy(z, t, reduction="none"))
    with ML.multilinear_pass(len(us)):
        out = loss(model(ML.input_jet(x, us)), y)
    return out.coeffs


class _Products(nn.Module):
    """Products of two jets, exp and log, division by a constant."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x) * torch.tanh(self.b(x)) + torch.exp(0.3 * self.a(x)) / 2.0
        return self.out(torch.log(1.0 + h * h))


class _CastsAndViews(nn.Module):
    """Casts, views and expands on the way (each treats every component alike)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x.double().to(torch.float64)))
        h = h.view_as(h).unflatten(1, (2, 3)).reshape_as(h) + h.mean(1, keepdim=True).expand_as(h)
        return self.b(torch.clone(h).type_as(x))


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.silu(self.conv(x)), 1))


class _PowersAndDivision(nn.Module):
    """Division by a jet, sqrt, rsqrt, reciprocal and constant powers (integer and not)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h, g = self.a(x), self.b(x)
        q = 1.0 + h * h
        z = h / q.sqrt() + torch.rsqrt(q) * g + torch.reciprocal(2.0 + torch.tanh(g)) + q ** 1.5
        return self.out(z + h.pow(2) - torch.pow(g, 3) / (1.5 + g * g) + q.rsqrt().reciprocal() + 2.0 / q)


class _JetProducts(nn.Module):
    """Matrix products of two jets (matmul, @, bmm) and a softmax between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        B = x.shape[0]
        p = torch.tanh(self.a(x)).view(B, 2, 3)
        q = self.b(x).view(B, 3, 2)
        m = torch.softmax(torch.matmul(p, q), dim=-1)      # (B, 2, 2)
        m = m @ torch.bmm(p, q) + torch.bmm(m, m)
        return self.out(m.reshape(B, 4))


class _Attention(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention (a composite rule), LayerNorm
    and RMSNorm before it, a mean over the positions after."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.ln, self.rms = nn.LayerNorm(d), nn.RMSNorm(d, eps=1e-6)
        self.out = nn.Linear(d, 3)

    def forward(self, x):                                # x: (B, L, d)
        q, k, v = self.qkv(self.ln(x)).unflatten(-1, (3, -1)).unbind(-2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(self.rms(x + a).mean(1))


class _TransformerLayer(nn.Module):
    """nn.TransformerEncoderLayer (pre-LayerNorm, multi-head attention with a causal mask, GELU
    feed-forward) and a final LayerNorm: nn.MultiheadAttention reaches the attention rule through
    F.multi_head_attention_forward's ops."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 3)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(5), persistent=False)

    def forward(self, x):                                # x: (B, 5, d)
        return self.out(self.norm(self.layer(x, src_mask=self.causal, is_causal=True)).mean(1))


class _InPlace(nn.Module):
    """Activations written into their input: F.silu(h, inplace=True) with its result dropped, then
    h read again beside F.leaky_relu's result (the caller sees h written, as in PyTorch)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        F.silu(h, inplace=True)
        g = F.leaky_relu(h, 0.1, inplace=True)
        return self.b(g + h)


MODELS = {
    "tanh": lambda: (nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), (5, 4)),
    "gelu": lambda: (nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)), (5, 4)),
    "gelu_tanh": lambda: (nn.Sequential(nn.Linear(4, 8), nn.GELU("tanh"), nn.Linear(8, 3)), (5, 4)),
    "sigmoid_softplus": lambda: (nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Softplus(2.0),
                                               nn.Linear(8, 3)), (5, 4)),
    "relu_leaky": lambda: (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU(0.1),
                                         nn.Linear(8, 3)), (5, 4)),
    "products_exp_log": lambda: (_Products(), (5, 4)),
    "casts_and_views": lambda: (_CastsAndViews(), (5, 4)),
    "cnn": lambda: (_SmallCNN(), (3, 1, 6, 6)),
    "mnist_cnn_eval": lambda: (MnistCNN().eval(), (2, 1, 28, 28)),     # conv, ReLU, max pooling, dropout
    "powers_division": lambda: (_PowersAndDivision(), (5, 4)),
    "jet_products_softmax": lambda: (_JetProducts(), (5, 6)),
    "attention_norms": lambda: (_Attention(), (3, 4, 6)),
    "transformer_layer": lambda: (_TransformerLayer(), (2, 5, 8)),
    "in_place": lambda: (_InPlace(), (5, 4)),
}


@pytest.mark.parametrize("N", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_components_are_nested_autograd_mixed_derivatives(name, N):
    torch.manual_seed(N)
    model, shape = MODELS[name]()
    model = model.double()
    x, y = torch.randn(shape, dtype=D64), torch.randint(0, 3, (shape[0],))
    us = [torch.randn(shape, dtype=D64) for _ in range(N)]
    c = _components(model, x, y, us)
    # the oracle: nested autograd, with LayerNorm and attention in primitive ops (PyTorch's own
    # higher derivatives of the fused ones are wrong); the pass above ran the real ones
    with primitive_ops():
        ref = nested_mixed(model, x, y, us)
        singles = [nested_mixed(model, x, y, [u])[0] for u in us]
    assert rel_err(c[0], F.cross_entropy(model(x), y, reduction="none")) <= 1e-13
    for n in range(1, N + 1):
        assert rel_err(c[ML.component(N, n)], ref[n - 1]) <= 1e-10, n
        # every other component is a mixed derivative too: the one of u_n alone
        only_n = ML.position(N)[1 << (n - 1)]
        assert rel_err(c[only_n], singles[n - 1]) <= 1e-10


def test_matmul_of_two_jets_broadcasts_as_matmul():
    """Two jets linear in the ε (a_∅ + Σ ε_i a_i) of different dims, (2, 3) @ (4, 3, 5): the product's
    components in closed form (∅: a₀b₀; {i}: a_i b₀ + a₀b_i; {1,2}: a₁b₂ + a₂b₁), broadcast as
    torch.matmul broadcasts; and the same through ``@`` with the operands' roles swapped."""
    torch.manual_seed(2)
    a = [torch.randn(2, 3, dtype=D64) for _ in range(3)]
    b = [torch.randn(4, 3, 5, dtype=D64) for _ in range(3)]
    with ML.multilinear_pass(2):
        ab = torch.matmul(ML.input_jet(a[0], a[1:]), ML.input_jet(b[0], b[1:]))
        bt_at = ML.input_jet(b[0], b[1:]).transpose(-2, -1) @ ML.input_jet(a[0], a[1:]).transpose(-2, -1)
    expect = [a[0] @ b[0], a[1] @ b[0] + a[0] @ b[1], a[2] @ b[0] + a[0] @ b[2], a[1] @ b[2] + a[2] @ b[1]]
    assert ab.shape == (4, 2, 5)
    for k, e in enumerate(expect):
        assert rel_err(ab.coeffs[k], e) <= 1e-14, k
        assert rel_err(bt_at.coeffs[k], e.transpose(-2, -1)) <= 1e-14, k


def test_softmax_and_cross_entropy_components_do_not_cancel_a_common_shift():
    """Softmax and log-softmax do not change when every score of a row moves by one amount; a
    jet's components can carry such a common part far larger than their differences (an untrained
    MobileBERT's attention: scores of 10⁴, order-3 components of 10⁷). Each row is shifted by its
    largest entry's whole jet, so the compositions never cancel terms of that size: here a common
    part of 10³ in every direction, orders 1–3 against nested autograd in float64 (1.3e-9 off with
    the primal shifted alone). The loss does not see the common part either (the cross-entropy of
    head(p) + z is shift-invariant too), so the oracle is nested autograd along the directions
    without it, where its own backward (p ⊙ (g − Σ p g)) is accurate."""
    torch.manual_seed(4)
    head = nn.Linear(3, 3).double()

    def model(z):
        return head(torch.softmax(z, dim=-1)) + z          # the loss's log-softmax sees z too
    x, y = torch.randn(4, 3, dtype=D64), torch.randint(0, 3, (4,))
    us = [torch.randn(4, 3, dtype=D64) for _ in range(3)]
    c = _components(model, x, y, [1e3 + u for u in us])
    ref = nested_mixed(model, x, y, us)
    for n in (1, 2, 3):
        assert rel_err(c[ML.component(3, n)], ref[n - 1]) <= 1e-11, n


def test_log_softmax_loss_and_its_gradients():
    """A hand-written NLL of log_softmax, and the parameter gradients of the components."""
    torch.manual_seed(3)
    model = MODELS["tanh"]()[0].double()
    x, y = torch.randn(6, 4, dtype=D64), torch.randint(0, 3, (6,))
    us = [torch.randn(6, 4, dtype=D64) for _ in range(3)]

    def nll(z, t):
        return -torch.log_softmax(z, dim=1).gather(1, t.unsqueeze(1)).squeeze(1)
    with ML.multilinear_pass(3):
        c = nll(model(ML.input_jet(x, us)), y).coeffs
    ref = nested_mixed(model, x, y, us)
    value = c[ML.component(3, 3)].abs().mean()
    g = torch.autograd.grad(value, list(model.parameters()))
    g_ref = torch.autograd.grad(ref[2].abs().mean(), list(model.parameters()))
    assert rel_err(c[ML.component(3, 2)], ref[1]) <= 1e-10
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) <= 1e-9


def test_an_op_without_a_rule_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 3)).double()
    x = torch.randn(3, 4, dtype=D64)
    with pytest.raises(ML.MultilinearUnsupported, match="group_norm"):
        with ML.multilinear_pass(2):
            model(ML.input_jet(x, [x, x]))
    with pytest.raises(ML.MultilinearUnsupported, match="sin"):
        with ML.multilinear_pass(2):
            torch.sin(ML.input_jet(x, [x, x]))
    assert ML.active() == 0


# -- the per-order penalty ------------------------------------------------------------------------

@pytest.fixture
def paths(monkeypatch):
    """Which pass each per-order penalty ran; eagerly the multilinear one wherever every op has a
    rule (not only where it is the faster); ``paths.polarize()`` forces polarization."""
    monkeypatch.setattr(ML, "EAGER_FLOP_PER_OP", 0.0)
    seen = []
    comp, coef = crr_mod._loss_components, crr_mod._loss_coefficients
    monkeypatch.setattr(crr_mod, "_loss_components", lambda *a, **k: (seen.append("multilinear"), comp(*a, **k))[1])
    monkeypatch.setattr(crr_mod, "_loss_coefficients", lambda *a, **k: (seen.append("polarization"), coef(*a, **k))[1])

    class Paths(list):
        def polarize(self):
            monkeypatch.setattr(ML, "probe", lambda *a, **k: ML.Probe(False))
    p = Paths()
    p.seen = seen
    return p


@pytest.mark.parametrize("orders,n_dirs,subset", [((2, 3), 1, None), ((1, 4), 2, 6), ((2, 2), 1, 5)])
def test_per_order_penalty_equals_polarization(paths, orders, n_dirs, subset):
    torch.manual_seed(4)
    model = MODELS["tanh"]()[0].double()
    x, y = torch.randn(10, 4, dtype=D64), torch.randint(0, 3, (10,))
    out = []
    for polar in (False, True):
        if polar:
            paths.polarize()
        R = cf.crr_penalty(model, x, y, orders=orders, directions="per_order", n_dirs=n_dirs, subset=subset,
                           generator=torch.Generator().manual_seed(7))
        out.append((R, torch.autograd.grad(R, list(model.parameters()))))
    assert paths.seen == ["multilinear", "polarization"]
    (a, ga), (b, gb) = out
    assert rel_err(a, b) <= 1e-12
    for p, q in zip(ga, gb):
        assert rel_err(p, q) <= 1e-12


def test_per_order_penalty_against_nested_autograd(paths):
    torch.manual_seed(5)
    model = MODELS["cnn"]()[0].double()
    x, y = torch.randn(4, 1, 6, 6, dtype=D64), torch.randint(0, 3, (4,))
    us = [torch.nn.functional.normalize(torch.randn(1, 4, 36, dtype=D64), dim=-1).reshape(1, 4, 1, 6, 6)
          for _ in range(3)]
    R = cf.crr_penalty(model, x, y, orders=(2, 3), directions=us, order_reduction="sum")
    d = nested_mixed(model, x, y, [u[0] for u in us])
    assert paths.seen == ["multilinear"]
    assert rel_err(R, d[1].abs().mean() + d[2].abs().mean()) <= 1e-10


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_dropout"])
def test_per_order_penalty_on_a_transformer_equals_polarization(paths, train):
    """A pre-LayerNorm transformer layer (multi-head attention, causal mask, GELU) under a per-order
    penalty: the multilinear pass gives the polarization pass's penalty and gradients, in eval mode
    and in train mode with dropout (attention weights and feed-forward: one mask per sample for
    every component and polarization row), and the captured program the eager one."""
    torch.manual_seed(13)
    model = _TransformerLayer().double()
    if train:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.2
        model.layer.self_attn.dropout = 0.2
    model.train(train)
    x, y = torch.randn(4, 5, 8, dtype=D64), torch.randint(0, 3, (4,))
    out = []
    for how in ("multilinear", "captured", "polarization"):
        if how == "polarization":
            paths.polarize()
        torch.manual_seed(14)
        R = cf.crr_penalty(model, x, y, orders=(1, 3), directions="per_order", n_dirs=2,
                           generator=torch.Generator().manual_seed(15),
                           compile="eager" if how == "captured" else False)
        out.append((R, torch.autograd.grad(R, list(model.parameters()))))
    assert paths.seen == ["multilinear", "multilinear", "polarization"]
    (a, ga), *others = out
    for b, gb in others:
        assert rel_err(a, b) <= 1e-12
        for p, q in zip(ga, gb):
            assert rel_err(p, q) <= 1e-10


class _Counted(nn.Module):
    """Counts its forward calls and bumps a buffer in each; GroupNorm has no multilinear rule."""

    def __init__(self, norm: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.norm = nn.GroupNorm(2, 8) if norm else nn.Identity()
        self.register_buffer("calls", torch.zeros(()))
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        with torch.no_grad():
            self.calls += 1
        return self.fc2(self.norm(torch.tanh(self.fc1(x))))


@pytest.mark.parametrize("norm", [False, True], ids=["supported", "falls_back"])
def test_probe_once_per_configuration_and_without_side_effects(paths, norm):
    torch.manual_seed(6)
    model = _Counted(norm).double()
    x, y = torch.randn(6, 4, dtype=D64), torch.randint(0, 3, (6,))
    R0 = None
    for step in range(3):
        state = torch.get_rng_state()
        before = model.forwards
        R = cf.crr_penalty(model, x, y, orders=(2, 3), directions="per_order",
                           generator=torch.Generator().manual_seed(1))
        assert torch.equal(torch.get_rng_state(), state)         # the probes fork the random state
        if step > 0:
            assert model.forwards == before + 1                   # probed once: one forward per call now
        R0 = R if R0 is None else R0
        assert rel_err(R, R0) == 0.0
    assert model.calls.item() == 3.0                              # buffers the probes touched restored
    assert paths.seen == ["polarization" if norm else "multilinear"] * 3


@pytest.mark.parametrize("n_dirs", [1, 2])
def test_train_mode_dropout_draws_as_polarization_and_nested_autograd(paths, n_dirs):
    """Dropout in train mode: one mask per sample for every component and direction set, the mask
    a plain forward draws: the same penalty as polarization (whose rows share it too) and, with
    one direction set, as nested autograd with the same seed."""
    torch.manual_seed(10)
    model = MnistCNN().double().train()
    x, y = torch.randn(3, 1, 28, 28, dtype=D64), torch.randint(0, 10, (3,))
    out = []
    for polar in (False, True):
        if polar:
            paths.polarize()
        torch.manual_seed(11)
        R = cf.crr_penalty(model, x, y, orders=(2, 3), directions="per_order", n_dirs=n_dirs,
                           generator=torch.Generator().manual_seed(12))
        out.append((R, torch.autograd.grad(R, list(model.parameters())), torch.rand(())))
    assert paths.seen == ["multilinear", "polarization"]
    (a, ga, ra), (b, gb, rb) = out
    assert ra == rb                                  # the same random stream afterwards
    assert rel_err(a, b) <= 1e-12
    for p, q in zip(ga, gb):
        assert rel_err(p, q) <= 1e-10
    if n_dirs == 1:
        U = crr_mod._per_order_directions("per_order", x, x, None, 3, 1, torch.Generator().manual_seed(12))
        torch.manual_seed(11)
        d = nested_mixed(model, x, y, list(U[0]))
        assert rel_err(a, 0.5 * (d[1].abs().mean() + d[2].abs().mean())) <= 1e-10


def test_autocast_and_half_precision_are_never_multilinear():
    model = MODELS["tanh"]()[0]
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    assert ML.supported(model, x, y, None, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ML.supported(model, x, y, None, 3)
    assert not ML.supported(model.half(), x.half(), y, None, 3)          # half precision: polarization


def test_a_plain_per_row_draw_is_one_draw_per_sample(paths):
    """A hand-written dropout mask (one plain draw per row) is refused by polarization, whose rows
    of a sample must see one function; a multilinear pass has one row per sample, so the penalty is
    the nested-autograd one with the same draw."""
    torch.manual_seed(7)
    lin = nn.Linear(3, 3).double()
    x, y = torch.randn(4, 3, dtype=D64), torch.randint(0, 3, (4,))
    us = [torch.nn.functional.normalize(torch.randn(1, 4, 3, dtype=D64), dim=-1) for _ in range(3)]

    def hand_dropout(z):
        h = torch.tanh(lin(z))
        return h * (torch.rand(h.shape, dtype=h.dtype) > 0.2)
    torch.manual_seed(8)
    R = cf.crr_penalty(hand_dropout, x, y, orders=(2, 3), directions=us, order_reduction="sum")
    torch.manual_seed(8)
    d = nested_mixed(hand_dropout, x, y, [u[0] for u in us])
    assert paths.seen == ["multilinear"]
    assert rel_err(R, d[1].abs().mean() + d[2].abs().mean()) <= 1e-10
    paths.polarize()
    with pytest.raises(cf.JetError, match="torch.rand drew a plain tensor"):
        cf.crr_penalty(hand_dropout, x, y, orders=(2, 3), directions="per_order")


def test_a_dropout_that_draws_nothing_is_not_refused(paths):
    """Polarization refuses a per-row draw of a plain tensor, but a dropout of a plain tensor in eval
    mode (training=False) or with p = 0 draws nothing (DeBERTa's relative-position dropout in eval
    mode): it passes, and the penalty is nested autograd's. With training=True and p > 0 it is
    still refused."""
    torch.manual_seed(16)
    lin = nn.Linear(3, 3).double()
    x, y = torch.randn(4, 3, dtype=D64), torch.randint(0, 3, (4,))
    us = [torch.nn.functional.normalize(torch.randn(1, 4, 3, dtype=D64), dim=-1) for _ in range(3)]

    def model(z, training=False):
        h = torch.tanh(lin(z))
        ones = torch.ones(h.shape, dtype=h.dtype)
        return h * F.dropout(ones, 0.3, training) * F.dropout(ones, p=0.0) * torch.dropout(ones, 0.5, False)
    paths.polarize()
    R = cf.crr_penalty(model, x, y, orders=(2, 3), directions=us, order_reduction="sum")
    d = nested_mixed(model, x, y, [u[0] for u in us])
    assert paths.seen == ["polarization"]
    assert rel_err(R, d[1].abs().mean() + d[2].abs().mean()) <= 1e-10
    with pytest.raises(cf.JetError, match="F.dropout drew a plain tensor"):
        cf.crr_penalty(lambda z: model(z, True), x, y, orders=(2, 3), directions=us)


def test_eager_takes_the_multilinear_pass_where_it_is_faster(monkeypatch):
    """Eagerly a small MLP keeps polarization (its subset arithmetic costs more ops than its
    products save), a wide one takes the multilinear pass; a captured graph always does."""
    seen = []
    comp = crr_mod._loss_components
    monkeypatch.setattr(crr_mod, "_loss_components", lambda *a, **k: (seen.append(1), comp(*a, **k))[1])
    torch.manual_seed(9)
    small = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    wide = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 10))
    for model, d, expect in ((small, 2, False), (wide, 256, True)):
        x, y = torch.randn(128, d), torch.randint(0, 2, (128,))
        p = ML.probe(model, x, y, None, 3)
        assert p.ok and p.macs == sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
        assert p.eager_faster(3, 128, x.device) is expect
        assert not p.eager_faster(3, 128, torch.device("cuda"))   # the univariate Triton kernels there
        seen.clear()
        cf.crr_penalty(model, x, y, orders=(2, 3), directions="per_order")
        assert bool(seen) is expect
        seen.clear()
        cf.crr_penalty(model, x, y, orders=(2, 3), directions="per_order", compile="eager")
        assert seen                                                 # captured: always


def test_the_tally_counts_the_stand_ins_for_fused_kernels_only():
    """The probe counts as extra ops the subset arithmetic of the rules that replace one fused
    univariate kernel (activations, cross-entropy); a LayerNorm (series code of many ops in either
    pass) adds none, and the GEMM multiply-adds are those of the linear layers."""
    torch.manual_seed(17)
    plain = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    normed = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    a, b = ML.probe(plain, x, y, None, 3), ML.probe(normed, x, y, None, 3)
    assert a.ok and b.ok and a.ops > 0
    assert b.ops == a.ops and b.macs == a.macs == 8 * 32 + 32 * 3


def test_the_probe_keys_the_labels():
    """Class indices and probability targets of one model and input shape are two configurations:
    cross-entropy's multilinear rule takes class indices only."""
    model = MODELS["tanh"]()[0]
    x = torch.randn(6, 4)
    assert ML.supported(model, x, torch.randint(0, 3, (6,)), None, 2)
    assert not ML.supported(model, x, torch.softmax(torch.randn(6, 3), 1), None, 2)
    assert ML.supported(model, x, torch.randint(0, 3, (6,)), None, 2)
