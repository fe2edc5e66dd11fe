"""CRR in the large-model training stack (docs/training.md): the jet under PyTorch's training
machinery (tensor hooks, identity autograd Functions, checkpointing, autocast), DDP in every mode
and FSDP2 on two gloo processes, the input-embedding helper, the Hugging Face and Lightning
integrations."""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import curvrate_fast as cf
from curvrate_fast.jets import dispatcher
from curvrate_fast.jets.tensor import JetError, JetTensor
from curvrate_fast.training import EmbeddingSpace, TinyGPT, causal_lm_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
D64 = torch.float64


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_diff(a, b):
    """The largest difference of two gradient dicts, relative to each parameter's largest entry."""
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-300)) for n in a)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).double()


def _xy(B=5, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=D64)
    return x, torch.randint(0, 3, (B,), generator=g), torch.randn(B, d, generator=g, dtype=D64)


# -- the jet's autograd face ----------------------------------------------------------------------

def test_autograd_metadata_and_hooks_are_the_coefficients():
    model = _mlp()
    x, y, u = _xy()
    seen = []
    with dispatcher.model_call():
        out = model(cf.input_jet(x, u, 3))
        assert isinstance(out, JetTensor)
        assert out.requires_grad and out.grad_fn is out.coeffs.grad_fn and not out.is_leaf
        assert out._base is None
        handle = out.register_hook(lambda g: seen.append(tuple(g.shape)))
        with pytest.raises(JetError, match="not a loss"):
            out.backward()
    out.coeffs.abs().sum().backward()
    assert seen == [tuple(out.coeffs.shape)]
    handle.remove()


def test_module_trackers_and_flop_counting_run_over_a_jet_pass():
    """torch.utils.module_tracker (FlopCounterMode's, the debug modes') registers a multi-grad hook on
    each module's inputs that require grad; the input jet answers requires_grad=True without an
    autograd graph, and autograd's lookup of its node (``t.view_as(t).grad_fn``) used to fail with
    an AttributeError. The CRR step inside FlopCounterMode or ModuleTracker gives the gradients it
    gives outside, and the FLOPs are counted."""
    from torch.utils.flop_counter import FlopCounterMode
    from torch.utils.module_tracker import ModuleTracker
    model = _mlp()
    x, y, _ = _xy()

    def grads(ctx):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with ctx:
            cf.CRRLoss(orders=(1, 3))(model, x, y).backward()
        return [p.grad.clone() for p in model.parameters()]
    ref = grads(contextlib.nullcontext())
    counter = FlopCounterMode(display=False)
    for ctx in (counter, ModuleTracker()):
        for a, b in zip(grads(ctx), ref):
            assert torch.equal(a, b)
    assert counter.get_total_flops() > 0


@pytest.mark.parametrize("where", [0, 2])
def test_module_full_backward_hooks_run_on_the_coefficients(where):
    """register_full_backward_hook / _pre_hook wrap a module's inputs and outputs in an identity
    Function (BackwardHookFunction) and insist that its outputs carry its backward node. For an
    input jet without an autograd graph (the first module's input; every input in the sample-mixing
    probe's graphless pass) that failed with PyTorch's 'Error while setting up backward hooks'.
    Now the hooks run in the penalty's backward, on the coefficients' gradients (shape (n+1, ...)),
    and the parameters' gradients equal the unhooked model's."""
    x, y, _ = _xy()

    def grads(model):
        torch.manual_seed(1)
        cf.CRRLoss(orders=(1, 3))(model, x, y).backward()
        return [p.grad for p in model.parameters()]
    ref = grads(_mlp())
    model, seen = _mlp(), []
    model[where].register_full_backward_hook(lambda mod, gi, go: seen.append(("post", gi[0].shape[1:])))
    model[where].register_full_backward_pre_hook(lambda mod, go: seen.append(("pre", go[0].shape[1:])))
    for a, b in zip(grads(model), ref):
        assert torch.equal(a, b)
    width = model[where].in_features
    assert seen == [("pre", (5, model[where].out_features)), ("post", (5, width))], seen


class _Scale(torch.autograd.Function):
    """Identity forward, backward scaled: a gradient-scaling layer (forward returns its input)."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x

    @staticmethod
    def backward(ctx, g):
        return ctx.c * g, None


class _CloneScale(_Scale):
    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.clone()


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class _Mid(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        torch.manual_seed(0)
        self.a = nn.Linear(3, 8).double()
        self.b = nn.Linear(8, 3).double()

    def forward(self, x):
        return self.b(self.fn(torch.tanh(self.a(x))))


@pytest.mark.parametrize("fn_cls", [_Scale, _CloneScale])
def test_identity_function_is_applied_to_the_coefficients(fn_cls):
    """An identity-forward Function (as DDP's and FSDP2's) receiving a jet: its backward runs on the
    coefficients' gradient. With a ×3 gradient scale, the parameters before it get 3× the
    penalty's gradient, those after it 1×."""
    x, y, u = _xy()
    plain, scaled = _Mid(lambda h: h), _Mid(lambda h: fn_cls.apply(h, 3.0))
    for m in (plain, scaled):
        cf.crr_penalty(m, x, y, orders=(1, 3), directions=u).backward()
    assert torch.allclose(scaled.a.weight.grad, 3 * plain.a.weight.grad, rtol=1e-12, atol=0)
    assert torch.allclose(scaled.b.weight.grad, plain.b.weight.grad, rtol=1e-12, atol=0)


def test_other_custom_function_raises():
    x, y, u = _xy()
    with pytest.raises(JetError, match="_Double"):
        cf.crr_penalty(_Mid(_Double.apply), x, y, orders=(1, 3), directions=u)


class _HandGelu(torch.autograd.Function):
    """A hand-written derivative of an ordinary forward (as BLOOM's GeLUFunction): x·sigmoid(1.702x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return g * (s + 1.702 * x * s * (1 - s))


class _RoundSTE(torch.autograd.Function):
    """A straight-through estimator: its backward is not the derivative of its forward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(4 * x) / 4 + 0.1 * x * x

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.fixture
def declared():
    """jet_through declarations made by a test, taken back after it."""
    made = []

    def declare(cls):
        made.append(cls)
        return cf.jet_through(cls)
    yield declare
    for cls in made:
        cf.jet_through(cls, enabled=False)


def test_jet_through_runs_a_declared_functions_forward(declared):
    """Undeclared, a Function that is not an identity raises; declared, its forward's ops give the
    Taylor coefficients, the loss derivatives and their parameter gradient of nested autograd (which
    calls its backward)."""
    from curvrate_fast import baseline
    x, y, u = _xy()
    m = _Mid(_HandGelu.apply)
    with pytest.raises(JetError, match="_HandGelu"):
        cf.jet(m, x, u, 3)
    declared(_HandGelu)
    ours, ref = cf.jet(m, x, u, 4), baseline.jet(m, x, u, 4)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-13)
    params = list(m.parameters())
    d, d_ref = (f.loss_directional_derivatives(m, x, y, u, 3) for f in (cf, baseline))
    assert torch.allclose(d, d_ref, rtol=1e-12, atol=1e-13)
    g = torch.autograd.grad(d.abs().sum(), params)
    g_ref = torch.autograd.grad(d_ref.abs().sum(), params)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    cf.jet_through(_HandGelu, enabled=False)
    with pytest.raises(JetError, match="_HandGelu"):
        cf.jet(m, x, u, 3)


def test_jet_through_refuses_a_backward_that_is_not_the_derivative(declared):
    x, y, u = _xy()
    declared(_RoundSTE)
    with pytest.raises(JetError, match=r"jet_through\(_RoundSTE\): its backward is not the derivative"):
        cf.jet(_Mid(_RoundSTE.apply), x, u, 2)
    with pytest.raises(TypeError, match="autograd.Function subclass"):
        cf.jet_through(nn.Tanh)


def test_jet_through_check_leaves_the_random_state_and_the_captured_graph_alone(declared):
    """The first-order check draws from its own generator (the global stream is untouched) and, run
    inside a capture, is not recorded: the graph is the same as when an eager call checked first."""
    x, y, u = _xy()
    declared(_HandGelu)
    m = _Mid(_HandGelu.apply)
    state = torch.get_rng_state()
    cf.jet(m, x, u, 2)
    assert torch.equal(state, torch.get_rng_state())

    def graph_ops():
        fast = cf.CompiledLoss(lambda m, x, y, u: cf.loss_directional_derivatives(m, x, y, u, 3).abs().mean(),
                               backend="eager")
        value = fast(m, x, y, u)
        gm, = fast.graphs()
        return value, [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    cf.jet_through(_HandGelu, enabled=False)
    declared(_HandGelu)               # unchecked again: the capture runs the check
    v1, ops1 = graph_ops()
    v2, ops2 = graph_ops()            # checked by now
    assert ops1 == ops2 and torch.equal(v1, v2)
    assert torch.allclose(v1, cf.loss_directional_derivatives(m, x, y, u, 3).abs().mean(), rtol=1e-12)


# -- checkpointing -----------------------------------------------------------------------------------

class _CheckpointedGPT(TinyGPT):
    reentrant = None

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        h = h + self.pos.weight[:h.shape[1]]
        for block in self.blocks:
            h = block(h) if self.reentrant is None else checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(self.ln_f(h))


def _lm_step_grads(reentrant, n_dirs=1):
    torch.manual_seed(0)
    m = _CheckpointedGPT(vocab=16, d=8, heads=2, layers=2, max_len=8).double()
    m.reentrant = reentrant
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (4, 6), generator=g)
    space = EmbeddingSpace(m)
    loss = space.task_loss(ids, ids) + space.penalty(ids, ids, generator=g,
                                                     crr=dict(orders=(1, 4), n_dirs=n_dirs, scale=0.5))
    loss.backward()
    return _grads(m)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_equals_unchecked(reentrant):
    ref = _lm_step_grads(None, n_dirs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _lm_step_grads(reentrant, n_dirs=2)
    assert _max_diff(got, ref) <= 1e-12


class _NoGradInside(nn.Module):
    """A block whose @torch.no_grad() helper computes a constant from its input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 3).double()

    @torch.no_grad()
    def stat(self, h):
        return h.pow(2).mean(-1, keepdim=True)

    def forward(self, h):
        return torch.tanh(self.lin(h)) * self.stat(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_keeps_decorated_no_grad_constant(reentrant):
    x, y, u = _xy()

    def run(wrap):
        blk = _NoGradInside()
        model = (lambda z: checkpoint(blk, z, use_reentrant=reentrant)) if wrap else blk
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # reentrant: "none of the inputs require grad"
            return cf.loss_directional_derivatives(model, x, y, u, 3, loss_fn=lambda o, t: o.sum(-1))
    assert torch.allclose(run(True), run(False), rtol=1e-13, atol=0)


class _WithNoGradInside(nn.Module):
    """A ``with torch.no_grad():`` block (not a decorator) inside the checkpointed segment."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3).double()

    def forward(self, h):
        with torch.no_grad():
            s = h.pow(2).mean(-1, keepdim=True)
        return torch.tanh(self.lin(h)) * s


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_keeps_no_grad_block_constant(reentrant):
    x, y, u = _xy()
    blk = _WithNoGradInside()

    def run(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cf.loss_directional_derivatives(model, x, y, u, 3, loss_fn=lambda o, t: o.sum(-1))

    ref = run(blk)
    got = run(lambda z: checkpoint(blk, z, use_reentrant=reentrant))
    assert torch.allclose(got, ref, rtol=1e-13, atol=0)
    # the block is a constant: differentiating it would give other numbers
    differentiated = run(lambda z: torch.tanh(blk.lin(z)) * z.pow(2).mean(-1, keepdim=True))
    assert not torch.allclose(differentiated, ref, rtol=1e-6, atol=0)
    import torch.utils.checkpoint as cp
    assert cp.CheckpointFunction.__name__ == "CheckpointFunction"    # restored after the pass


def test_fsdp_unit_output_runs_its_deferred_gemm_before_the_reshard():
    """A jet an FSDP2 unit returns with its GEMM deferred (the Triton path) has that GEMM run by
    the engine's global forward hook, which runs before FSDP2's own post-forward (the reshard).
    The unit's class is swapped to an FSDPModule subclass as fully_shard does; the unit's own
    forward hook stands in for the reshard and records what it sees."""
    from torch.distributed.fsdp import FSDPModule

    from curvrate_fast.jets import dispatcher
    from curvrate_fast.jets.tensor import JetTensor

    g = torch.Generator().manual_seed(3)
    W, b = torch.randn(4, 3, generator=g, dtype=D64), torch.randn(4, generator=g, dtype=D64)
    xc = torch.randn(3, 2, 3, generator=g, dtype=D64)

    class Unit(nn.Module):
        def forward(self, h):
            return JetTensor.deferred_linear(xc, W, b, 2)

    unit = Unit()
    unit.__class__ = type("FSDPUnit", (FSDPModule, Unit), {})
    seen = []
    unit.register_forward_hook(lambda m, i, out: seen.append(out._pending))
    handle = torch.nn.modules.module.register_module_forward_hook(dispatcher._fsdp_post_hook)
    try:
        with dispatcher.model_call():
            out = unit(torch.zeros(1))
    finally:
        handle.remove()
    assert seen == [None]                        # materialized before the unit's own hook
    ref = torch.nn.functional.linear(xc, W)
    ref[0] += b
    assert torch.equal(out._coeffs, ref)
    # a unit that is not FSDP keeps its GEMM deferred (the fused activation may still take it)
    plain = Unit()
    with dispatcher.model_call():
        out2 = plain(torch.zeros(1))
        dispatcher._fsdp_post_hook(plain, (), out2)
    assert out2._pending is not None


# -- mixed precision ---------------------------------------------------------------------------------

def _worst_rel(got, ref):
    return max(float((got[n].double() - ref[n]).norm() / ref[n].norm()) for n in ref)


def _lm_precision(dtype, loss_scale=1.0):
    """Worst-parameter relative gradient error vs float64 of CE and of the penalty (orders 1-4),
    each under autocast(dtype) on a float32 copy of the model."""
    torch.manual_seed(0)
    m64 = TinyGPT(vocab=64, d=32, heads=2, layers=2, max_len=32).double()
    m32 = copy.deepcopy(m64).float()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    u = torch.randn(4, 16, 32, generator=g, dtype=D64)
    u = u / u.flatten(1).norm(dim=1).reshape(4, 1, 1)

    def grads(model, part, amp):
        model.zero_grad()
        space = EmbeddingSpace(model)
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            loss = space.task_loss(ids, ids) if part == "ce" else space.penalty(
                ids, ids, crr=dict(orders=(1, 4), directions=u.to(next(model.parameters()).dtype)))
        (loss * loss_scale).backward()
        return {n: p.grad.detach().double() / loss_scale for n, p in model.named_parameters()}
    return {part: _worst_rel(grads(m32, part, True), grads(m64, part, False)) for part in ("ce", "pen")}


def test_autocast_bf16_penalty_gradient_within_bound():
    err = _lm_precision(torch.bfloat16)
    assert err["pen"] <= 3 * err["ce"], err


def test_autocast_fp16_with_loss_scaling_within_bound():
    # fp16 training needs loss scaling (GradScaler): the penalty's gradient is far below CE's
    err = _lm_precision(torch.float16, loss_scale=2.0 ** 16)
    assert err["pen"] <= 3 * err["ce"], err


def test_autocast_jet_dtypes_follow_autocast():
    torch.manual_seed(0)
    x, w = torch.randn(6, 8), torch.randn(8, 8)
    y = torch.randint(0, 8, (6,))
    ops = {
        "linear": lambda t: F.linear(t, w),
        "layer_norm": lambda t: F.layer_norm(t, (8,)),
        "layer_norm_of_linear": lambda t: F.layer_norm(F.linear(t, w), (8,)),
        "gelu_of_linear": lambda t: F.gelu(F.linear(t, w)),
        "cross_entropy_of_linear": lambda t: F.cross_entropy(F.linear(t, w), y, reduction="none"),
        "softmax_of_linear": lambda t: torch.softmax(F.linear(t, w), -1),
        "sdpa": lambda t: F.scaled_dot_product_attention(t[None], t[None], t[None]),
        "mul_mixed": lambda t: F.linear(t, w) * t,
    }
    for dtype in (torch.bfloat16, torch.float16):
        for name, op in ops.items():
            with torch.autocast("cpu", dtype=dtype):
                plain = op(x)
                c = cf.jet(op, x, 0.05 * torch.randn_like(x), 3)
            want = torch.float32 if (dtype == torch.float16 and plain.dtype == torch.float16) else plain.dtype
            assert c.dtype == want, (dtype, name, c.dtype, plain.dtype)


class _CNN(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Conv2d(1, 16, 3), nn.GELU(), nn.Conv2d(16, 32, 3), nn.GELU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 12 * 12, 64), nn.GELU(), nn.Linear(64, 10))


def _cnn_order_errors(scale):
    m64 = _CNN().double()
    m32 = copy.deepcopy(m64).float()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=g, dtype=D64)
    y = torch.randint(0, 10, (8,), generator=g)
    u = torch.randn(8, 1, 28, 28, generator=g, dtype=D64)
    u = u / u.flatten(1).norm(dim=1).reshape(8, 1, 1, 1)
    ref = cf.loss_directional_derivatives(m64, x, y, u, 4)
    old = dispatcher.precision.fp16_direction_scale
    dispatcher.precision.fp16_direction_scale = scale
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            got = cf.loss_directional_derivatives(m32, x.float(), y, u.float(), 4)
    finally:
        dispatcher.precision.fp16_direction_scale = old
    return [float((got[k].detach().double() - ref[k].detach()).norm() / ref[k].detach().norm()) for k in range(4)]


def test_fp16_direction_scaling_keeps_high_orders():
    scaled = _cnn_order_errors(dispatcher.precision.fp16_direction_scale)
    assert max(scaled) < 0.1, scaled
    unscaled = _cnn_order_errors(1.0)
    assert unscaled[3] > 3 * scaled[3], (unscaled, scaled)   # what the scaling is for


def test_fp16_overflow_raises():
    x, y, u = _xy()
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(JetError, match="overflowed"):
        cf.loss_directional_derivatives(_mlp().float(), x.float(), y, 1e3 * u.float(), 4)


def test_fp16_switched_off_raises():
    old = dispatcher.precision.fp16_direction_scale
    dispatcher.precision.fp16_direction_scale = 0
    try:
        x, y, u = _xy()
        with torch.autocast("cpu", dtype=torch.float16), pytest.raises(JetError, match="float16"):
            cf.loss_directional_derivatives(_mlp().float(), x.float(), y, u.float(), 3)
    finally:
        dispatcher.precision.fp16_direction_scale = old


# -- the input-embedding space ------------------------------------------------------------------

def _gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
                                  bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def test_embedding_space_equals_inputs_embeds_on_hf_model():
    """The hook-based helper gives the penalty and its gradients of crr_penalty on the model's
    inputs_embeds path with x = wte(ids) (padding mask, several directions)."""
    model = _gpt2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[-1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    u = torch.randn(2, 3, 7, 16, generator=g, dtype=D64)
    crr = dict(orders=(1, 4), directions=u, scale=0.3)

    R1 = EmbeddingSpace(model).penalty(ids, labels, crr=crr, attention_mask=mask)
    R1.backward()
    g1 = _grads(model)
    model.zero_grad()
    x = model.get_input_embeddings()(ids)
    # the mask sized by the rows the model gets: the engine's two direction rows per sample (a mask
    # made for those 6 rows alone would not fit the batch of 3, and is refused as batch-size dependent)
    R2 = cf.crr_penalty(lambda e: model(inputs_embeds=e, attention_mask=mask.repeat(e.shape[0] // 3, 1)).logits,
                        x, labels, loss_fn=causal_lm_loss, **crr)
    R2.backward()
    assert torch.allclose(R1, R2, rtol=1e-12, atol=0)
    assert _max_diff(g1, _grads(model)) <= 1e-12
    assert float(g1["transformer.wte.weight"].abs().sum()) > 0   # the embedding table gets the penalty's gradient


def test_embedding_space_loss_with_a_subset_runs_the_task_forward_on_the_others_only():
    """space.loss with a subset: the penalized samples' task losses come off the jet pass and only
    the others get an ordinary forward; value and gradients equal the whole batch's task loss plus
    space.penalty with the same draws (float64)."""
    model = _gpt2(3)
    ids = torch.randint(0, 30, (6, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    space = EmbeddingSpace(model)
    crr = dict(orders=(1, 3), directions="per_order", scale=0.7)
    rows = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    model.zero_grad()
    loss = space.loss(ids, ids, subset=4, generator=torch.Generator().manual_seed(5), crr=crr, attention_mask=mask)
    handle.remove()
    loss.backward()
    g1 = _grads(model)
    model.zero_grad()
    target = space.task_loss(ids, ids, attention_mask=mask) + space.penalty(
        ids, ids, subset=4, generator=torch.Generator().manual_seed(5), crr=crr, attention_mask=mask)
    target.backward()
    assert torch.allclose(loss, target, rtol=1e-12, atol=0)
    assert _max_diff(g1, _grads(model)) <= 1e-10
    assert rows[-1] == 2          # the ordinary forward: the 6 - 4 samples outside the subset
    with pytest.raises(TypeError, match="unknown arguments"):
        space.loss(ids, ids, subset=4, crr=dict(order=3))


@pytest.mark.parametrize("subset", [None, 4])
def test_embedding_space_refuses_compile_with_its_reason(subset):
    """EmbeddingSpace's jet enters through a forward hook, which a captured graph refuses: asked for
    compile, it says so itself (the capture's own error named a function the user never wrote)."""
    space = EmbeddingSpace(_gpt2(3))
    ids = torch.randint(0, 30, (6, 7), generator=torch.Generator().manual_seed(1))
    for call in (lambda: space.loss(ids, ids, subset=subset, crr=dict(orders=(1, 2), compile=True)),
                 lambda: space.penalty(ids, ids, subset=subset, crr=dict(compile_options={"x": 1}))):
        with pytest.raises(ValueError, match=r"EmbeddingSpace\.(loss|penalty): compile is not supported"):
            call()


def test_embedding_space_subset_and_curvature_rate():
    model = _gpt2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (6, 7), generator=g)
    space = EmbeddingSpace(model)
    R = space.loss(ids, ids, subset=0.5, generator=g, crr=dict(orders=(1, 3), directions="per_order"))
    assert torch.isfinite(R) and R.requires_grad
    lam = space.curvature_rate(ids, ids, generator=torch.Generator().manual_seed(0))
    assert lam.n_samples == 6 and torch.isfinite(torch.tensor(lam.value))


# -- DDP in every mode and FSDP2, two gloo processes ----------------------------------------------

@pytest.fixture(scope="module")
def distributed_runs():
    import _dist_training as dt
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as d:
        codes, res = dt.run_all(d, timeout=120.0)
    return dt, codes, res


@pytest.mark.parametrize("mode", ["ddp", "ddp_find_unused", "ddp_find_unused_two_forwards", "ddp_static_graph",
                                  "ddp_no_sync", "fsdp2", "ddp_captured"])
def test_distributed_crr_step_equals_one_process(distributed_runs, mode):
    dt, codes, res = distributed_runs
    assert codes == [0, 0], f"the ranks exited with {codes} (a crash or a hang)"
    ref = dt.reference_captured() if mode == "ddp_captured" else dt.reference(one_forward=mode == "ddp_find_unused")
    for rank in (0, 1):
        got = res[rank][mode]
        assert not isinstance(got, str), f"rank {rank}:\n{got}"
        assert _max_diff(got, ref) <= 1e-10


def test_distributed_capture_refuses_a_ddp_mode_whose_forward_a_replay_skips(distributed_runs):
    dt, codes, res = distributed_runs
    assert codes == [0, 0], f"the ranks exited with {codes} (a crash or a hang)"
    for rank in (0, 1):
        got = res[rank]["ddp_captured_refused"]
        assert not isinstance(got, str), f"rank {rank}:\n{got}"
        assert "find_unused_parameters=True" in got["find_unused"] and "without compile" in got["find_unused"]
        assert "broadcast_buffers=True" in got["updated_buffer"] and "buffer 'module.0.shift'" in got["updated_buffer"]


# -- trainers ------------------------------------------------------------------------------------

def test_hf_trainer_trains_with_penalty_and_tracks_lambda():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from curvrate_fast.training.hf import CRRTrainer, CurvatureRateCallback
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 32, (16, 12), generator=torch.Generator().manual_seed(0))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i], "attention_mask": torch.ones(12, dtype=torch.long)}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as d:
        args = transformers.TrainingArguments(output_dir=d, max_steps=3, per_device_train_batch_size=4,
                                              report_to=[], use_cpu=True, logging_steps=1,
                                              save_strategy="no", disable_tqdm=True)
        cb = CurvatureRateCallback(ids[:4], every=1)
        trainer = CRRTrainer(model=model, args=args, train_dataset=Data(), callbacks=[cb],
                             crr=dict(orders=(1, 3), scale=0.5), crr_subset=0.5)
        trainer.train()
    pens = [h["crr_penalty"] for h in trainer.state.log_history if "crr_penalty" in h]
    assert len(pens) == 3 and all(p > 0 for p in pens)
    assert [s for s, _ in cb.history] == [0, 1, 2, 3]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lightning_callback_tracks_lambda_with_crr_in_training_step():
    pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning (the 'lightning' extra) is not installed")
    from curvrate_fast.training.lightning import CurvatureRateCallback

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = TinyGPT(vocab=32, d=16, heads=2, layers=1, max_len=16)
            self.space = EmbeddingSpace(self.model)
            self.penalties = []

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            R = self.space.penalty(ids, ids, crr=dict(orders=(1, 3), scale=0.5))
            self.penalties.append(float(R))
            return self.space.task_loss(ids, ids) + R

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-3)

    ids = torch.randint(0, 32, (16, 10), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    cb = CurvatureRateCallback(ids[:4], None, every_n_steps=1, embedding_space=True, model=lambda m: m.model)
    module = LM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]).fit(module, loader)
    assert len(module.penalties) == 3 and all(p > 0 for p in module.penalties)
    assert [s for s, _ in cb.history] == [0, 1, 2, 3]
