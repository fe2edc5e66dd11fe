"""Tiny Hugging Face ``transformers`` models with random weights for tests/test_real_models.py.

Nothing is downloaded: every model is built from a config written here, in float64 and eval mode
(dropout off, BatchNorm on running statistics). The text models are driven through
``inputs_embeds`` (the jet is the input embedding), the vision models through ``pixel_values``.
Each builder returns a ``Case``: ``forward(x)`` gives the tensor whose jet is compared (the logits,
or the last hidden state) and ``loss_fn(out, y)`` a per-sample loss of shape (B,). transformers
initializes weights from the global generator: each model is built under a fixed seed inside
``torch.random.fork_rng`` (the caller's generator state is left as it was), then every parameter
is moved by a seeded ``torch.Generator``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

D64 = torch.float64
TEXT_ATTN = ("eager", "sdpa")


@dataclass
class Case:
    name: str
    module: nn.Module          # the transformers model (its parameters get the CRR gradient)
    forward: Callable          # x -> the compared output tensor (a plain function of x)
    loss_fn: Callable          # (output, y) -> (B,) per-sample loss
    x: torch.Tensor
    y: torch.Tensor


def _perturb(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Move every parameter (and BatchNorm's running statistics) off its initial value with a
    seeded generator, so LayerNorm/RMSNorm gains, biases and BN statistics are not the trivial
    1/0 and the higher derivatives are not tiny."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g, dtype=D64))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=D64))
    return model


def _fan_in_init(model: nn.Module, seed: int, gain: float) -> nn.Module:
    """Every weight of rank ≥ 2 (convolutions, depthwise ones included, and linears) drawn anew as
    gain·N(0, 1)/√fan_in, so that signals and their derivatives keep their size through a deep
    stack (with the models' own small initializations the input derivatives of a 17-block
    MobileNetV2 vanish to 1e-20 by order 4); the rest is left to _perturb."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(gain * torch.randn(p.shape, generator=g, dtype=p.dtype) / fan_in ** 0.5)
    return model


def _build(cls, cfg, seed: int, scale: float = 0.3, gain: float = 0.0) -> nn.Module:
    """``cls(cfg)`` initialized under the fixed seed ``seed``, in float64 and eval mode, then
    (``gain`` > 0) re-drawn with fan-in scaling, and perturbed with the seed ``seed + 100``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model = model.double().eval()
    if gain:
        _fan_in_init(model, seed + 50, gain)
    return _perturb(model, seed + 100, scale)


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token cross-entropy with fixed labels y (B, T)."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T), reduction="none").reshape(B, T).mean(1)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _inputs(seed: int, B: int, T: int, H: int, V: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=D64)
    y = torch.randint(0, V, (B, T), generator=g)
    return x, y


def _padding_mask(B: int, T: int, pad: bool):
    """None, or a right-padding attention mask: the last sample's last two positions are padding
    (no query row is fully masked, so no softmax sees only -inf)."""
    if not pad:
        return None
    m = torch.ones(B, T, dtype=torch.long)
    m[-1, -2:] = 0
    return m


def _tag(name: str, attn: str, pad: bool) -> str:
    return f"{name}-{attn}" + ("-padmask" if pad else "")


def bert(attn: str, seed: int = 0, pad: bool = False) -> Case:
    """BERT encoder (2 layers, hidden 16, 2 heads, GELU) + pooler (tanh) + classifier; loss: CE;
    batch 3, 6 tokens."""
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, type_vocab_size=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                                  initializer_range=0.3)
    cfg._attn_implementation = attn
    model = _build(transformers.BertForSequenceClassification, cfg, seed)
    x, _ = _inputs(seed + 200, 3, 6, 16, 3)
    y = torch.tensor([0, 2, 1])
    mask = _padding_mask(3, 6, pad)
    return Case(_tag("bert", attn, pad), model, lambda e: model(inputs_embeds=e, attention_mask=mask).logits,
                _ce, x, y)


def bert_hidden(attn: str, seed: int = 0) -> Case:
    """The BERT encoder's last hidden state (for the jet comparison)."""
    c = bert(attn, seed, pad=False)
    m = c.module
    return Case(c.name + "-hidden", m, lambda e: m.bert(inputs_embeds=e).last_hidden_state,
                lambda h, y: (h * h).mean((1, 2)), c.x, c.y)


def gpt2(attn: str, seed: int = 1, pad: bool = False, upcast: bool = False) -> Case:
    """GPT-2 LM (2 layers, hidden 16, 2 heads, gelu_new); loss: per-sample mean token CE.
    ``upcast``: the reorder_and_upcast_attn path (eager only: torch.empty(float32) + baddbmm(beta=0)
    on q.float(), k.float()); that path raises in a float64 model (the float64 mask promotes the
    float32 scores), so this model is float32 throughout."""
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
                                  reorder_and_upcast_attn=upcast, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = attn
    model = _build(transformers.GPT2LMHeadModel, cfg, seed)
    x, y = _inputs(seed + 200, 2, 5, 16, 30)
    if upcast:
        model, x = model.float(), x.float()
    mask = _padding_mask(2, 5, pad)
    name = _tag("gpt2", attn, pad) + ("-upcast" if upcast else "")
    return Case(name, model, lambda e: model(inputs_embeds=e, attention_mask=mask).logits, _lm_loss, x, y)


def llama(attn: str, seed: int = 2, pad: bool = False) -> Case:
    """Llama LM (2 layers, hidden 16, 4 heads / 2 KV heads (GQA), RoPE, RMSNorm, SwiGLU);
    loss: per-sample mean token CE."""
    cfg = transformers.LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   initializer_range=0.3, attention_dropout=0.0)
    cfg._attn_implementation = attn
    model = _build(transformers.LlamaForCausalLM, cfg, seed)
    x, y = _inputs(seed + 200, 2, 6, 16, 30)
    mask = _padding_mask(2, 6, pad)
    return Case(_tag("llama", attn, pad), model, lambda e: model(inputs_embeds=e, attention_mask=mask).logits,
                _lm_loss, x, y)


# More decoder LMs, each with what sets it apart from Llama: Qwen2 (biased q/k/v), Mistral (sliding
# window), Gemma2 (RMSNorm scaled by 1 + w, tanh soft-capping of attention scores and logits, GELU-tanh,
# sliding and global layers), Phi-3 (fused qkv and gate-up projections), OLMo (non-parametric
# LayerNorm), Qwen3 (RMSNorm on queries and keys)
DECODERS = {
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 4}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "olmo": ("OlmoConfig", {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
}


def decoder(family: str, seed: int = 6) -> Case:
    """A causal LM of the family (2 layers, hidden 16, 2 heads / 1 KV head, eager attention: the
    nested-autograd oracle cannot run SDPA); loss: per-sample mean token CE."""
    config_name, extra = DECODERS[family]
    cfg = getattr(transformers, config_name)(vocab_size=30, hidden_size=16, intermediate_size=24,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=16, initializer_range=0.3, **extra)
    cfg._attn_implementation = "eager"
    model = _build(transformers.AutoModelForCausalLM.from_config, cfg, seed)
    x, y = _inputs(seed + 200, 2, 6, 16, 30)
    return Case(f"{family}-eager", model, lambda e: model(inputs_embeds=e).logits, _lm_loss, x, y)


def _images(seed: int, B: int, C: int, S: int, n_labels: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, S, S, generator=g, dtype=D64), torch.randint(0, n_labels, (B,), generator=g)


def efficientnet(seed: int = 3) -> Case:
    """EfficientNet (SiLU, depthwise conv with ZeroPad2d, squeeze-excite with sigmoid, BatchNorm,
    'same' padding, residual); width ×0.25, 2 stages, 12×12 images."""
    cfg = transformers.EfficientNetConfig(
        image_size=12, width_coefficient=0.25, depth_coefficient=1.0, depth_divisor=4,
        kernel_sizes=(3, 5), in_channels=(32, 32), out_channels=(32, 48), strides=(1, 2),
        num_block_repeats=(1, 1), expand_ratios=(1, 2), hidden_dim=320, num_labels=3,
        dropout_rate=0.0, drop_connect_rate=0.0, initializer_range=0.3)
    model = _build(transformers.EfficientNetForImageClassification, cfg, seed, 0.1, gain=3.0)
    x, y = _images(seed + 200, 2, 3, 12, 3)
    return Case("efficientnet", model, lambda p: model(pixel_values=p).logits, _ce, x, y)


def pp_lcnet(seed: int = 4) -> Case:
    """PP-LCNet, MobileNetV3-style: hardswish, depthwise conv, squeeze-excite with ReLU and
    hardsigmoid, BatchNorm; 5 one-block stages of 8-16 channels, 12×12 images."""
    # the config insists on 5 stages: (kernel, in, out, stride, squeeze-excite)
    blocks = [[[3, 8, 8, 1, False]], [[3, 8, 8, 2, False]], [[3, 8, 8, 1, False]], [[3, 8, 16, 2, False]],
              [[5, 16, 16, 1, True]]]
    cfg = transformers.PPLCNetConfig(block_configs=blocks,
                                     stem_channels=8, class_expand=16, num_labels=3, hidden_dropout_prob=0.0)
    model = _build(transformers.PPLCNetForImageClassification, cfg, seed, 0.1, gain=1.5)
    x, y = _images(seed + 200, 2, 3, 12, 3)
    # its classification output names the logits last_hidden_state
    return Case("pp_lcnet", model, lambda p: model(pixel_values=p).last_hidden_state, _ce, x, y)


def mobilenet_v2(seed: int = 5) -> Case:
    """MobileNetV2 (ReLU6, depthwise conv, inverted residuals, BatchNorm), width 0.25, 16×16 images."""
    cfg = transformers.MobileNetV2Config(image_size=16, depth_multiplier=0.25, min_depth=4, expand_ratio=2.0,
                                         num_labels=3, classifier_dropout_prob=0.0)
    model = _build(transformers.MobileNetV2ForImageClassification, cfg, seed, 0.1, gain=1.5)
    x, y = _images(seed + 200, 2, 3, 16, 3)
    return Case("mobilenet_v2", model, lambda p: model(pixel_values=p).logits, _ce, x, y)


def levit(seed: int = 6) -> Case:
    """LeViT (Hardswish, conv stem, attention with learned positional biases gathered by index,
    subsampling attention, BatchNorm-folded linears); one small stage."""
    cfg = transformers.LevitConfig(image_size=32, patch_size=16, hidden_sizes=(16, 24), num_attention_heads=(2, 2),
                                   depths=(1, 1), key_dim=(4, 4), mlp_ratio=(2, 2), attention_ratio=(2, 2),
                                   down_ops=[["Subsample", 4, 16 // 4, 2, 2, 2]], num_labels=3,
                                   initializer_range=0.3)
    model = _build(transformers.LevitForImageClassification, cfg, seed, 0.1, gain=1.2)
    x, y = _images(seed + 200, 2, 3, 32, 3)
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]

    def forward(p):
        # in eval mode LeViT caches attention_biases[:, idxs] (with its autograd graph) across
        # calls: a second backward through it would fail, so every call indexes afresh
        for c in caches:
            c.clear()
        return model(pixel_values=p).logits
    return Case("levit", model, forward, _ce, x, y)


class Float64Casts(TorchFunctionMode):
    """Inside the block, casts of float64 tensors to a lower float dtype keep float64.

    Llama's RMSNorm computes in float32 (``hidden_states.to(torch.float32)``) and its eager
    attention takes ``softmax(..., dtype=torch.float32)``: in a float64 model those round to float32,
    so neither the engine nor the oracle can be compared at 1e-9 there. This mode is applied to the
    engine run and the oracle run alike (the same model semantics, in float64 throughout)."""

    _LOW = (torch.float32, torch.float16, torch.bfloat16)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and src.dtype == D64:
            if kwargs.get("dtype") in self._LOW:
                kwargs["dtype"] = D64
            args = tuple(D64 if (i > 0 and isinstance(a, torch.dtype) and a in self._LOW) else a
                         for i, a in enumerate(args))
            if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
                func, args = torch.Tensor.double, args[:1]
        return func(*args, **kwargs)


# More vision families (eager attention), each with what sets it apart: ViT (patch embedding, CLS
# token, LayerNorm), Swin (shifted windows: roll, window partition, attention masks, relative
# position bias), BEiT (relative position bias, layer scale), ConvNeXt-V2 (depthwise 7x7 convs,
# channels-last LayerNorm, global response normalization), ResNet (BatchNorm in eval, max pooling)
VISION_MORE = {
    "vit": ("ViTConfig", "ViTForImageClassification", 8,
            dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=24)),
    "swin": ("SwinConfig", "SwinForImageClassification", 16,
             dict(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)),
    "beit": ("BeitConfig", "BeitForImageClassification", 8,
             dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=24, use_relative_position_bias=True)),
    "convnextv2": ("ConvNextV2Config", "ConvNextV2ForImageClassification", 16,
                   dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=16, patch_size=2)),
    "resnet": ("ResNetConfig", "ResNetForImageClassification", 16,
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
}


def vision_more(family: str, seed: int = 4) -> Case:
    """A tiny image classifier of the family (3 labels), weights re-drawn with fan-in scaling."""
    config_name, model_name, size, kw = VISION_MORE[family]
    cfg = getattr(transformers, config_name)(num_channels=3, num_labels=3, **kw)
    cfg._attn_implementation = "eager"
    model = _build(getattr(transformers, model_name), cfg, seed, gain=1.0)
    x, y = _images(seed + 200, 2, 3, size, 3)
    return Case(f"{family}-eager", model, lambda p: model(pixel_values=p).logits, _ce, x, y)


# Further families, each with what sets it apart (built from tiny configs like the ones above; eager
# attention): BLOOM (ALiBi position biases through ``alibi.baddbmm(batch1=..., batch2=..., beta=...,
# alpha=...)``, keyword arguments that once failed in the engine; a custom autograd Function for its
# GELU, declared with ``jet_through``), DeBERTa-v2 (disentangled
# content-to-position and position-to-content attention, relative position buckets gathered by
# index), T5's encoder (relative position bias, RMS-style T5LayerNorm, gated-free ReLU MLP),
# MobileBERT (NoNorm: an elementwise affine map in place of LayerNorm, bottlenecks), Mamba (the
# selective scan's reference PyTorch path: a causal depthwise conv1d, softplus step sizes, a
# Python loop over time; ``use_cache=False``, as the cache is written in place), SegFormer
# (attention over a sequence shortened by a strided convolution, depthwise-conv Mix-FFN).
def _text_family(config_name: str, model_name: str, cfg_kw: dict, seed: int, call_kw: dict = None,
                 n_labels: int = 0):
    """A text model driven through inputs_embeds: an LM (per-sample mean token CE) or, with
    n_labels, a sequence classifier (CE)."""
    base = dict(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, initializer_range=0.3)
    cfg = getattr(transformers, config_name)(**{**base, **cfg_kw})
    cfg._attn_implementation = "eager"
    model = _build(getattr(transformers, model_name), cfg, seed)
    x, y = _inputs(seed + 200, 2, 6, 16, 30)
    kw = dict(call_kw or {})
    if n_labels:
        y = torch.randint(0, n_labels, (2,), generator=torch.Generator().manual_seed(seed + 300))
        return model, (lambda e: model(inputs_embeds=e, **kw).logits), _ce, x, y
    return model, (lambda e: model(inputs_embeds=e, **kw).logits), _lm_loss, x, y


def _t5_encoder_logits(seed: int):
    """T5's encoder with a linear read-out of its last hidden state (3 labels, mean over tokens)."""
    cfg = transformers.T5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                                dropout_rate=0.0, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16, initializer_factor=1.0)
    cfg._attn_implementation = "eager"
    model = _build(transformers.T5EncoderModel, cfg, seed)
    head = torch.randn(16, 3, generator=torch.Generator().manual_seed(seed + 400), dtype=D64)
    x, _ = _inputs(seed + 200, 2, 6, 16, 30)
    y = torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(seed + 300))
    return model, (lambda e: model(inputs_embeds=e).last_hidden_state.mean(1) @ head), _ce, x, y


def _segformer(seed: int):
    cfg = transformers.SegformerConfig(num_labels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                       hidden_sizes=[8, 16], num_attention_heads=[1, 2], decoder_hidden_size=16)
    model = _build(transformers.SegformerForImageClassification, cfg, seed, gain=1.0)
    x, y = _images(seed + 200, 2, 3, 32, 3)
    return model, (lambda p: model(pixel_values=p).logits), _ce, x, y


def _bloom(seed: int):
    """BLOOM; its MLP's GeLUFunction (a custom autograd Function with a hand-written derivative of
    the tanh-GELU) declared with curvrate_fast.jet_through, as a user would."""
    from transformers.models.bloom.modeling_bloom import GeLUFunction

    import curvrate_fast
    curvrate_fast.jet_through(GeLUFunction)
    return _text_family("BloomConfig", "BloomForCausalLM", dict(n_layer=2, n_head=2), seed)


FAMILIES = {
    "bloom": _bloom,
    "deberta_v2": lambda s: _text_family(
        "DebertaV2Config", "DebertaV2ForSequenceClassification",
        dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, relative_attention=True,
             pos_att_type=["p2c", "c2p"], max_relative_positions=8), s, n_labels=3),
    "t5_encoder": _t5_encoder_logits,
    "mobilebert": lambda s: _text_family(
        "MobileBertConfig", "MobileBertForSequenceClassification",
        dict(embedding_size=16, intra_bottleneck_size=8, true_hidden_size=8, num_feedforward_networks=1,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3), s, n_labels=3),
    "mamba": lambda s: _text_family("MambaConfig", "MambaForCausalLM",
                                    dict(state_size=4, expand=2, conv_kernel=3, time_step_rank=4), s,
                                    call_kw=dict(use_cache=False)),
    "segformer": _segformer,
}


def family(name: str, seed: int = 7) -> Case:
    """A tiny model of one of :data:`FAMILIES`."""
    model, forward, loss_fn, x, y = FAMILIES[name](seed)
    return Case(name, model, forward, loss_fn, x, y)
