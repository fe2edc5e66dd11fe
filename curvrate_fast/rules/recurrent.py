"""Taylor rules for the recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: ``torch.rnn_tanh``,
``torch.rnn_relu``, ``torch.lstm``, ``torch.gru``) and their cells (``nn.RNNCell``, ``nn.GRUCell``,
``nn.LSTMCell``: ``torch.*_cell``), written as the cell equations over the time steps with ops
that have rules (PyTorch's documented formulas, gate order as in the weights):

    RNN:   h' = act(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh)                     act = tanh or relu
    LSTM:  i, f, g, o = σ, σ, tanh, σ of the four chunks of x W_ihᵀ + b_ih + h W_hhᵀ + b_hh
           c' = f ⊙ c + i ⊙ g,   h' = o ⊙ tanh(c')   (then h' W_hrᵀ with ``proj_size``)
    GRU:   r, z = σ of the first two chunks of x W_ihᵀ + b_ih + h W_hhᵀ + b_hh
           n = tanh(x W_inᵀ + b_in + r ⊙ (h W_hnᵀ + b_hn)),   h' = (1 − z) ⊙ n + z ⊙ h

Layers are stacked, a bidirectional layer runs the reversed sequence with its own weights and
concatenates the two outputs. Every step is a composition of linear maps and activations, so the
coefficients are exact to any order. Not supported, with an error that says so: packed sequences
(``PackedSequence``) and dropout between layers in train mode (the native kernel's masks cannot be
drawn again outside it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jets.registry import register
from ._common import JetError


def _layer_weights(params: Sequence[Tensor], num_layers: int, dirs: int) -> List[List[Tensor]]:
    per = len(params) // (num_layers * dirs)
    if per * num_layers * dirs != len(params):
        raise JetError(f"recurrent layer: {len(params)} weights do not split into {num_layers} layer(s) x {dirs} "
                       "direction(s)")
    return [list(params[i * per:(i + 1) * per]) for i in range(num_layers * dirs)]


def _unpack(w: List[Tensor], has_biases: bool):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction."""
    w_ih, w_hh = w[0], w[1]
    b_ih = b_hh = None
    rest = w[2:]
    if has_biases:
        b_ih, b_hh, rest = rest[0], rest[1], rest[2:]
    w_hr = rest[0] if rest else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def _run(kind: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], params: Sequence[Tensor], has_biases: bool,
         num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool):
    """(output, h_n, c_n or None) by the cell equations (module docstring)."""
    if dropout > 0.0 and train and num_layers > 1:
        raise JetError(f"{kind} with dropout between layers in train mode and a jet: the native kernel's dropout "
                       "masks cannot be drawn again outside it. Use eval mode for the derivatives, or dropout=0 "
                       "with an nn.Dropout between single-layer recurrent modules")
    dirs = 2 if bidirectional else 1
    weights = _layer_weights(params, num_layers, dirs)
    seq = x.transpose(0, 1) if batch_first else x          # (T, B, F)
    if seq.dim() != 3:
        raise JetError(f"{kind} with a jet: an unbatched input (2-d) is not supported; add a batch dimension")
    T = seq.shape[0]
    layer_in = seq
    h_last, c_last = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh, w_hr = _unpack(weights[idx], has_biases)
            h = h0[idx]
            c = c0[idx] if c0 is not None else None
            xs = F.linear(layer_in, w_ih, b_ih)            # the input part of every step at once
            steps = range(T - 1, -1, -1) if d == 1 else range(T)
            out_t: List[Optional[Tensor]] = [None] * T
            for t in steps:
                h, c = _cell(kind, xs[t], h, c, w_hh, b_hh, w_hr)
                out_t[t] = h
            outs.append(torch.stack(out_t))
            h_last.append(h)
            if c is not None:
                c_last.append(c)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
    output = layer_in.transpose(0, 1) if batch_first else layer_in
    return output, torch.stack(h_last), (torch.stack(c_last) if c_last else None)


def _cell(kind: str, xw: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
          w_hr: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    hw = F.linear(h, w_hh, b_hh)
    if kind == "lstm":
        i, f, g, o = (xw + hw).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        return h, c
    if kind == "gru":
        x_r, x_z, x_n = xw.chunk(3, dim=-1)
        h_r, h_z, h_n = hw.chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    pre = xw + hw
    return (torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)), None


@register(torch.lstm)
def lstm(*args, **kwargs):
    """``torch.lstm(input, (h0, c0), params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first)`` -> (output, h_n, c_n)."""
    if len(args) > 1 and isinstance(args[1], Tensor):
        raise JetError("torch.lstm with a packed sequence (PackedSequence) and a jet: not supported; pad the "
                       "batch (torch.nn.utils.rnn.pad_packed_sequence) and pass a plain tensor")
    x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    out, h, c = _run("lstm", x, hx[0], hx[1], params, has_biases, num_layers, dropout, train, bidirectional,
                     batch_first)
    return out, h, c


def _single_state(kind: str):
    def rule(*args, **kwargs):
        if len(args) > 2 and isinstance(args[1], Tensor) and isinstance(args[2], Tensor):
            raise JetError(f"torch.{kind} with a packed sequence (PackedSequence) and a jet: not supported; pad "
                           "the batch (torch.nn.utils.rnn.pad_packed_sequence) and pass a plain tensor")
        x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
        out, h, _ = _run(kind, x, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                         batch_first)
        return out, h
    rule.__doc__ = (f"``torch.{kind}(input, h0, params, has_biases, num_layers, dropout, train, bidirectional, "
                    "batch_first)`` -> (output, h_n).")
    return rule


register(torch.gru)(_single_state("gru"))
register(torch.rnn_tanh)(_single_state("rnn_tanh"))
register(torch.rnn_relu)(_single_state("rnn_relu"))


# -- single cells (nn.RNNCell, nn.GRUCell, nn.LSTMCell): one step of the equations above ----------

@register(torch.lstm_cell)
def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """``torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)`` -> (h', c')."""
    return _cell("lstm", F.linear(input, w_ih, b_ih), hx[0], hx[1], w_hh, b_hh, None)


def _single_cell(kind: str):
    def rule(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        return _cell(kind, F.linear(input, w_ih, b_ih), hx, None, w_hh, b_hh, None)[0]
    rule.__doc__ = f"``torch.{kind}_cell(x, h, w_ih, w_hh, b_ih, b_hh)`` -> h'."
    return rule


register(torch.gru_cell)(_single_cell("gru"))
register(torch.rnn_tanh_cell)(_single_cell("rnn_tanh"))
register(torch.rnn_relu_cell)(_single_cell("rnn_relu"))
