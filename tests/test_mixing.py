"""A model whose per-sample loss depends on other samples is refused (curvrate_fast.mixing): its
per-sample input derivatives are not defined, and the batched pass used to return a number
anyway (neither the per-sample derivative nor nested autograd's). Models that treat samples
independently are untouched, and the probe moves no random stream."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import CountingIdentity, mlp

import curvrate_fast as cf
from curvrate_fast import mixing

D64 = torch.float64


class BatchMixing(nn.Module):
    """An MLP behind a hand-written operation across the batch dimension."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.net = mlp(nn.Tanh()).to(D64)

    def forward(self, x):
        if self.kind == "batch_mean":            # centering with batch statistics
            x = x - x.mean(0, keepdim=True)
        elif self.kind == "batch_std":
            x = x / (x.std(0, keepdim=True) + 1.0)
        elif self.kind == "softmax_over_batch":
            x = x * torch.softmax(x.sum(1), 0)[:, None]
        elif self.kind == "attention_across_batch":
            x = torch.softmax(x @ x.T, -1) @ x
        elif self.kind == "max_over_batch":      # reaches the others from the argmax sample only
            x = x - x.max(0, keepdim=True).values
        return self.net(x)


KINDS = ["batch_mean", "batch_std", "softmax_over_batch", "attention_across_batch", "max_over_batch"]
ENTRY_POINTS = {
    "loss_directional_derivatives": lambda m, x, y: cf.loss_directional_derivatives(m, x, y, torch.randn_like(x), 2),
    "curvature_rate": lambda m, x, y: cf.curvature_rate(m, x, y, max_order=3),
    "crr_penalty": lambda m, x, y: cf.crr_penalty(m, x, y, orders=(1, 2)),
    "crr_per_order_subset": lambda m, x, y: cf.crr_penalty(m, x, y, orders=(2, 3), directions="per_order",
                                                           subset=6),
    "CRRLoss_captured": lambda m, x, y: cf.CRRLoss(orders=(1, 2), compile="eager")(m, x, y),
}


def _data(seed=0):
    torch.manual_seed(seed)
    return torch.randn(8, 5, dtype=D64), torch.randint(0, 3, (8,))


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("kind", KINDS)
def test_models_that_mix_samples_are_refused(kind, entry):
    x, y = _data()
    with pytest.raises(cf.SampleMixingError, match="mixes samples across the batch"):
        ENTRY_POINTS[entry](BatchMixing(kind), x, y)


def test_a_function_model_and_batch_statistics_as_constants():
    """A plain function (an inline lambda) is probed too; statistics of the batch taken without
    gradient (detach) are constants along every sample's path: allowed, and equal to the
    per-sample derivative of that function computed one sample at a time."""
    x, y = _data(1)
    net = mlp(nn.Tanh()).to(D64)
    with pytest.raises(cf.SampleMixingError):
        cf.crr_penalty(lambda z: net(z - z.mean(0, keepdim=True)), x, y)
    mu = x.mean(0, keepdim=True)
    u = torch.randn_like(x)
    d = cf.loss_directional_derivatives(lambda z: net(z - z.detach().mean(0, keepdim=True)), x, y, u, 3)
    for b in range(x.shape[0]):             # one sample at a time, the batch mean a constant
        db = cf.loss_directional_derivatives(lambda z: net(z - mu), x[b:b + 1], y[b:b + 1], u[b:b + 1], 3)
        assert torch.allclose(d[:, b], db[:, 0], rtol=1e-12, atol=1e-14)


def test_independent_models_pass_once_per_configuration_without_moving_the_random_stream():
    x, y = _data(2)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).to(D64).train()
    draws = []
    for _ in range(2):                      # the first call probes, the second finds it done
        torch.manual_seed(3)
        cf.crr_penalty(model, x, y, orders=(1, 2))
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])
    assert len(mixing._checked_modules[model]) == 1
    model.eval()                            # another configuration: probed again
    cf.crr_penalty(model, x, y, orders=(1, 2))
    assert len(mixing._checked_modules[model]) == 2


def test_a_batch_of_one_and_a_loss_that_is_not_per_sample_are_left_to_the_other_checks():
    x, y = _data(3)
    model = BatchMixing("batch_std")
    cf.loss_directional_derivatives(model, x[:1], y[:1], torch.randn_like(x[:1]), 2)   # nothing to mix
    with pytest.raises(ValueError, match="one loss per sample"):
        cf.loss_directional_derivatives(mlp(nn.Tanh()).to(D64), x, y, torch.randn_like(x), 2,
                                        loss_fn=F.cross_entropy)


def test_the_probe_leaves_buffers_updated_in_place_as_it_found_them():
    """The probe is a forward of its own: a buffer the forward updates in place is restored after
    it, so the first call updates it once, like every later call (and like eager PyTorch)."""
    x, y = _data(4)
    model = nn.Sequential(CountingIdentity(5), mlp(nn.Tanh()).to(D64))
    cf.crr_penalty(model, x, y, orders=(1, 2))
    assert model[0].calls.item() == 1
    assert torch.allclose(model[0].ema, 0.1 * x.mean(0), rtol=1e-15, atol=0)

    class Wrapper:                          # a plain object holding the model (as EmbeddingSpace)
        def __init__(self, module):
            self.module = module

    wrapped = nn.Sequential(CountingIdentity(5), mlp(nn.Tanh()).to(D64))
    holder = Wrapper(wrapped)
    cf.crr_penalty(lambda z: holder.module(z), x, y, orders=(1, 2))
    assert wrapped[0].calls.item() == 1


def test_a_closure_made_anew_each_step_is_probed_once():
    """A model function built per step around the same module (what EmbeddingSpace does, with the
    step's token ids in its closure) is one configuration: one probe, not one per step; a module
    of another architecture behind the same code is probed again."""
    mixing._checked_structures.clear()             # no architecture probed by an earlier test
    net, other = mlp(nn.Tanh()).to(D64), mlp(nn.GELU()).to(D64)
    calls = []
    real = cf.api.jet

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def make(module, shift):
        return lambda z: module(z + shift)       # shift: a fresh tensor every step
    try:
        cf.api.jet = counted                     # the probe's jet (looked up at each probe)
        for step in range(3):
            x, y = _data(10 + step)
            cf.crr_penalty(make(net, torch.full((5,), float(step), dtype=D64)), x, y, orders=(1, 2))
        cf.crr_penalty(make(other, torch.zeros(5, dtype=D64)), x, y, orders=(1, 2))
    finally:
        cf.api.jet = real
    assert len(calls) == 2 * 6               # two configurations, a probe of 2·⌈log₂ 8⌉ passes each


def test_a_sequence_first_attention_model_is_refused_with_the_layout_hint():
    """nn.MultiheadAttention defaults to batch_first=False: fed (L, N, E), it attends along dim 0,
    which the library reads as the batch. Refused, the message naming the layout."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            h, _ = self.att(x, x, x, need_weights=False)
            return self.out(h).mean(1)

    torch.manual_seed(5)
    model = SeqFirst().to(D64).eval()
    x, y = torch.randn(5, 2, 4, dtype=D64), torch.randint(0, 3, (5,))
    with pytest.raises(cf.SampleMixingError, match="batch_first=False"):
        cf.crr_penalty(model, x, y, orders=(1, 2))


def test_a_max_over_the_batch_is_found_whichever_sample_holds_the_argmax():
    """Sample 1 holds every feature's maximum: a pass that moves it and holds others sees them
    follow it."""
    x, y = _data(6)
    x[1] = x.abs().max(0).values + 1.0
    with pytest.raises(cf.SampleMixingError, match="mixes samples across the batch"):
        cf.crr_penalty(BatchMixing("max_over_batch"), x, y, orders=(1, 2))


class PairCoupled(nn.Module):
    """Independent samples except one ordered pair: sample ``target``'s output reads sample
    ``source``'s input (a bug such as an off-by-one gather, a roll or a misplaced reshape)."""

    def __init__(self, source, target):
        super().__init__()
        self.source, self.target = source, target
        self.net = mlp(nn.Tanh()).to(D64)

    def forward(self, x):
        out = self.net(x)
        at_target = torch.zeros(out.shape, dtype=out.dtype)
        at_target[self.target, 0] = 0.3          # one logit: a shift of all would leave the CE as it is
        return out + at_target * x[self.source].sum()


@pytest.mark.parametrize("B", [2, 5, 8])
def test_a_coupling_of_any_one_pair_of_samples_is_found(B):
    """Every ordered pair (source → target) is split by one of the probe's passes, so a model that
    couples just two samples is refused whichever two they are (the probe of two random halves
    let the pairs that fell in one half through: 24 of the 56 ordered pairs at B = 8, 8 of 20 at B = 5)."""
    x, y = _data(7)
    x, y = x[:B], y[:B]
    for source in range(B):
        for target in range(B):
            if source != target:
                with pytest.raises(cf.SampleMixingError, match=f"sample {target} moves"):
                    cf.crr_penalty(PairCoupled(source, target), x, y, orders=(1, 2))
    assert len(list(mixing._probe_sets(B))) == 2 * max(1, (B - 1).bit_length())


def test_a_closure_over_an_index_is_probed_for_each_value():
    """The probe's memory keys a function's closure ints, flags and strings by value: the same
    code rolling the batch by 0 (independent) and then by 1 (sample b reads sample b - 1) is two
    configurations, and the second is refused (keyed by type, it was skipped as already probed)."""
    net = mlp(nn.Tanh()).to(D64)
    x, y = _data(8)

    def make(shift):
        return lambda z: net(z.roll(shift, 0))
    cf.crr_penalty(make(0), x, y, orders=(1, 2))
    with pytest.raises(cf.SampleMixingError, match="mixes samples"):
        cf.crr_penalty(make(1), x, y, orders=(1, 2))


class BatchStatsInTraining(nn.Module):
    """Centers with the batch mean in train mode only (a hand-written batch normalization)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True) if self.training else x


@pytest.mark.parametrize("wrap", ["module", "function"])
def test_a_submodule_switched_to_train_mode_is_probed_again(wrap):
    """The probe's memory keys the train flag of every module the model runs: probed in eval mode
    (independent), then with one submodule (or, behind a function, the module) in train mode,
    where it mixes: refused. Keyed by the top module's flag alone it passed unprobed."""
    x, y = _data(9)
    model = nn.Sequential(BatchStatsInTraining(), mlp(nn.Tanh()).to(D64)).eval()
    fn = model if wrap == "module" else (lambda z: model(z))
    cf.crr_penalty(fn, x, y, orders=(1, 2))
    model[0].train()
    with pytest.raises(cf.SampleMixingError, match="mixes samples"):
        cf.crr_penalty(fn, x, y, orders=(1, 2))



def test_instances_of_one_architecture_share_a_probe():
    """A new instance of the same architecture (a new seed, a fresh model per run) reuses the probe:
    its structure (classes, attributes, train flags, parameter shapes) is the configuration. A
    module with an attribute that is not a plain value is probed per instance; another train mode
    or another architecture is probed again."""
    calls = []
    real = cf.api.jet

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    mixing._checked_structures.clear()             # no architecture probed by an earlier test
    x, y = _data(12)
    passes = 6                                      # 2·⌈log₂ 8⌉
    try:
        cf.api.jet = counted                        # the probe's jet (looked up at each probe)
        for _ in range(3):
            require = mixing.require_per_sample
            require(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D64), x, y)
        assert len(calls) == passes
        require(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D64).train(False), x, y)
        assert len(calls) == 2 * passes             # another train flag
        require(nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).to(D64), x, y)
        assert len(calls) == 3 * passes             # another width
        for _ in range(2):
            odd = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D64)
            odd.note = object()                     # not a plain value: per instance
            require(odd, x, y)
        assert len(calls) == 5 * passes
    finally:
        cf.api.jet = real


# -- the batch size: the engine runs D copies of the batch for D direction rows per sample ------

class _RowPosition(nn.Module):
    """Adds the row's position along dim 0: sample b sees b in its batch, but b + d·B in copy d of
    the engine's tiled rows."""

    def __init__(self):
        super().__init__()
        self.net = mlp(nn.Tanh()).to(D64)

    def forward(self, x):
        return self.net(x + 0.1 * torch.arange(x.shape[0], dtype=x.dtype).unsqueeze(1))


class _BatchSizedBuffer(nn.Module):
    """A per-row scale held as a buffer made for a batch of 8: the tiled rows do not broadcast."""

    def __init__(self):
        super().__init__()
        self.net = mlp(nn.Tanh()).to(D64)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8, dtype=D64).unsqueeze(1))

    def forward(self, x):
        return self.net(x * self.scale)


def _divided_by_len_y(z, y):
    return F.cross_entropy(z, y, reduction="none") / len(y)


BATCH_SIZED = {
    "output_times_batch_size": (lambda: (lambda z, net=mlp(nn.Tanh()).to(D64): net(z) * z.shape[0]), None),
    "loss_divided_by_len_y": (lambda: mlp(nn.Tanh()).to(D64), _divided_by_len_y),
    "row_position": (lambda: _RowPosition(), None),
}
TILING_ENTRY_POINTS = {
    "loss_directional_derivatives_D3": lambda m, x, y, lf: cf.loss_directional_derivatives(
        m, x, y, torch.randn((3,) + tuple(x.shape), dtype=D64), 2, lf),
    "crr_fixed_n_dirs2": lambda m, x, y, lf: cf.crr_penalty(m, x, y, loss_fn=lf, orders=(1, 2), n_dirs=2),
    "crr_per_order_polarization": lambda m, x, y, lf: cf.crr_penalty(m, x, y, loss_fn=lf, orders=(2, 3),
                                                                     directions="per_order"),
    "crr_per_order_multilinear_n_dirs2": lambda m, x, y, lf: cf.crr_penalty(
        m, x, y, loss_fn=lf, orders=(2, 3), directions="per_order", n_dirs=2),
    "curvature_rate_n_dirs2": lambda m, x, y, lf: cf.curvature_rate(m, x, y, max_order=3, n_dirs=2, loss_fn=lf),
}


@pytest.fixture
def multilinear_everywhere(monkeypatch):
    """The per-order passes of this module's small MLPs take the multilinear pass eagerly too
    (a model this small keeps polarization there), unless a test forces polarization."""
    from curvrate_fast.jets import multilinear as ML
    monkeypatch.setattr(ML, "EAGER_FLOP_PER_OP", 0.0)
    return ML


@pytest.mark.parametrize("entry", sorted(TILING_ENTRY_POINTS))
@pytest.mark.parametrize("kind", sorted(BATCH_SIZED))
def test_a_loss_that_reads_the_batch_size_is_refused_where_the_batch_is_tiled(kind, entry, multilinear_everywhere,
                                                                               monkeypatch):
    """Nested autograd runs every direction on the batch as given; the engine's D direction rows per
    sample are D copies of the batch, so a per-sample loss that reads the batch size would come out
    another function (D times smaller for a loss divided by len(y)), silently. Refused by name."""
    if entry == "crr_per_order_polarization":
        monkeypatch.setattr(multilinear_everywhere, "probe", lambda *a, **k: multilinear_everywhere.Probe(False))
    model, loss_fn = BATCH_SIZED[kind]
    x, y = _data(20)
    with pytest.raises(cf.SampleMixingError, match="depends on the batch size"):
        TILING_ENTRY_POINTS[entry](model(), x, y, loss_fn)


@pytest.mark.parametrize("kind", sorted(BATCH_SIZED))
def test_with_one_row_per_sample_a_loss_that_reads_the_batch_size_runs_as_nested_autograd(kind, multilinear_everywhere):
    """Where the engine runs the batch as given (one fixed direction; per-order directions in a
    multilinear pass) there is nothing to refuse: the derivatives are those of nested autograd on
    that batch."""
    from curvrate_fast import baseline
    make, loss_fn = BATCH_SIZED[kind]
    model = make()
    x, y = _data(21)
    u = torch.randn_like(x)
    d = cf.loss_directional_derivatives(model, x, y, u, 3, loss_fn)
    ref = baseline.loss_directional_derivatives(model, x, y, u, 3, loss_fn)
    assert torch.allclose(d.detach(), ref.detach(), rtol=1e-10, atol=1e-12 * float(ref.detach().abs().max()))
    us = [torch.randn_like(x) for _ in range(3)]
    R = cf.crr_penalty(model, x, y, loss_fn=loss_fn, orders=(2, 3), directions=us)
    lf = loss_fn or baseline.per_sample_cross_entropy
    nested = baseline.nested_directional_derivatives(lambda X: lf(model(X), y), x, lambda n, X: us[n - 1], 3)
    assert torch.allclose(R, nested[1:].abs().mean(1).mean(), rtol=1e-10, atol=0)


def test_a_model_that_fails_on_the_tiled_rows_only_names_the_batch_size():
    x, y = _data(22)
    with pytest.raises(cf.SampleMixingError, match="fails on the 2·8 = 16 rows") as err:
        cf.crr_penalty(_BatchSizedBuffer(), x, y, orders=(1, 2), n_dirs=2)
    assert isinstance(err.value.__cause__, RuntimeError)       # torch's broadcasting error, kept
    cf.crr_penalty(_BatchSizedBuffer(), x, y, orders=(1, 2))  # one row per sample: runs


@pytest.mark.parametrize("entry", ["crr_fixed_n_dirs2", "crr_per_order_polarization",
                                   "loss_directional_derivatives_D3"])
def test_train_mode_dropout_is_not_taken_for_a_batch_size_dependence(entry, multilinear_everywhere, monkeypatch):
    """The probe's copies of a sample share their dropout masks, drawn from the random state of the
    batch's own pass: a model in train mode with dropout passes (and the probe moves no stream)."""
    if entry == "crr_per_order_polarization":
        monkeypatch.setattr(multilinear_everywhere, "probe", lambda *a, **k: multilinear_everywhere.Probe(False))
    x, y = _data(23)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).to(D64).train()
    TILING_ENTRY_POINTS[entry](model, x, y, None)


def test_a_plain_per_row_draw_is_left_unprobed_where_rows_draw_apart():
    """A model that draws a plain tensor row by row (no rule sees it, so copies cannot share it):
    with fixed directions each direction row draws its own, as nested autograd's separate forwards
    do; the batch-size probe cannot compare such a model and lets it run."""
    x, y = _data(24)
    net = mlp(nn.Tanh()).to(D64)

    def noisy(z):
        return net(z + 0.01 * torch.rand(z.shape, dtype=z.dtype))
    cf.crr_penalty(noisy, x, y, orders=(1, 2), n_dirs=2)


def test_the_batch_size_probe_runs_once_per_number_of_copies():
    calls = []
    real = cf.api.jet

    def counted(*args, **kwargs):
        calls.append(args[1].shape[0])
        return real(*args, **kwargs)
    x, y = _data(25)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D64)
    model.note = object()                           # probed per instance (no shared structure)
    try:
        cf.api.jet = counted
        for _ in range(2):
            mixing.require_per_sample(model, x, y, copies=3)
        assert calls == [8] * 6 + [8, 24]           # mixing: 2·⌈log₂ 8⌉; batch size: the batch, its 3 copies
        mixing.require_per_sample(model, x[:1], y[:1], copies=2)
        assert calls[8:] == [1, 2]                  # one sample, two copies: the batch size only
    finally:
        cf.api.jet = real


def test_under_autocast_the_copies_are_compared_at_its_precision():
    """bfloat16 autocast: the copies are compared at 1 % (another row count may pick another kernel:
    on CUDA it does; this CPU's rows happen to agree exactly): a model that treats samples alike
    passes, a loss divided by len(y) is still refused."""
    x, y = _data(26)
    x = x.float()
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cf.crr_penalty(model, x, y, orders=(1, 2), n_dirs=2)
        with pytest.raises(cf.SampleMixingError, match="depends on the batch size"):
            cf.crr_penalty(model, x, y, loss_fn=_divided_by_len_y, orders=(1, 2), n_dirs=2)
