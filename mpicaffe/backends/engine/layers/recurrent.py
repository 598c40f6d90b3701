"""Recurrent layers: RNN, LSTM and LSTMUnit.

Caffe runs RNN and LSTM as a hidden net unrolled over the T timesteps of its input; here the same
arithmetic is a loop over timesteps in torch ops, and autograd gives backpropagation through time.
Inputs follow Caffe: x (T x N x ...), cont (T x N, 0 where a sequence starts), an optional static
input x_static (N x ...) and, with recurrent_param.expose_hidden, the initial hidden state as extra
bottoms and the final one as extra tops. Parameter blobs have Caffe's order and shapes, so
.caffemodel weights load:

    RNN:  W_xh (D x I), b_h (D), [W_x_static (D x S)], W_hh (D x D), W_ho (D x D), b_o (D)
    LSTM: W_xc (4D x I), b_c (4D), [W_x_static (4D x S)], W_hc (4D x D)

(D = num_output, I = x's size per timestep and stream, S = x_static's size per stream.)
No diff ever reaches cont (Caffe's AllowForceBackward is false for it), nor h_0/c_0, nor the
previous batch through a carried state; diffs on the h_T/c_T tops are dropped, as in Caffe.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from mpicaffe.backends.engine.layers import register
from mpicaffe.backends.engine.layers.base import Layer


def _lstm_step(c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step (Caffe's LSTMUnit): gates hold pre-activations in Caffe's order i, f, o, g.

    c_prev: (..., D), gates: (..., 4D), cont: broadcastable to (..., 1). Returns (c, h).
    """
    i, f, o, g = gates.chunk(4, dim=-1)
    i, f, o, g = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
    # Caffe: c = cont * f * c_prev + i * g, no clipping; cont 0 forgets the previous cell
    c = cont * f * c_prev + i * g
    return c, o * torch.tanh(c)


class _Recurrent(Layer):
    """What RNN and LSTM share (Caffe's RecurrentLayer): bottoms, tops, checks, carried state."""

    # hidden states carried from step to step: ("h",) for RNN, ("h", "c") for LSTM
    states: ClassVar[tuple[str, ...]] = ()
    # rows of the input projections per output unit: 1 for RNN, 4 gates for LSTM
    gates: ClassVar[int] = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Caffe's RecurrentLayer without expose_hidden starts each forward from the state the
        # previous forward ended in (zeros at first); cont 0 at t = 0 cuts it off
        self._carried: list[torch.Tensor] | None = None

    @property
    def expose_hidden(self) -> bool:
        return self.param.recurrent_param.expose_hidden

    @property
    def has_static(self) -> bool:
        # Caffe: one bottom more than the minimum is the static input, placed before h_0
        return len(self.param.bottom) > self._min_bottoms()

    def _min_bottoms(self) -> int:
        return 2 + (len(self.states) if self.expose_hidden else 0)

    def check_counts(self) -> None:
        lo, nb, nt = self._min_bottoms(), len(self.param.bottom), len(self.param.top)
        state_bottoms = " + ".join(f"{s}_0" for s in self.states)
        if not lo <= nb <= lo + 1:
            want = f"x, cont, [x_static], {state_bottoms}" if self.expose_hidden else "x, cont, [x_static]"
            raise self.error(f"takes {lo} or {lo + 1} bottom blobs ({want}), got {nb}")
        want_tops = 1 + (len(self.states) if self.expose_hidden else 0)
        if nt != want_tops:
            names = ", ".join(["output"] + [f"{s}_T" for s in self.states] * self.expose_hidden)
            raise self.error(f"takes exactly {want_tops} top blob(s) ({names}), got {nt}")

    def _check(self, bottoms: list[torch.Tensor]) -> tuple[int, int]:
        """Caffe's RecurrentLayer shape checks; returns (T, N)."""
        x, cont = bottoms[0], bottoms[1]
        if x.dim() < 3:
            raise self.error(f"bottom 0 (x) must have at least 3 axes (timesteps, streams, features...), "
                             f"got shape {tuple(x.shape)}")
        t, n = x.shape[0], x.shape[1]
        if tuple(cont.shape) != (t, n):
            raise self.error(f"bottom 1 (cont) must have shape (timesteps, streams) = ({t}, {n}) like x, "
                             f"got {tuple(cont.shape)}")
        k = 2
        if self.has_static:
            s = bottoms[2]
            if s.dim() < 1 or s.shape[0] != n:
                raise self.error(f"bottom 2 (x_static) must have {n} streams on axis 0 like x, "
                                 f"got shape {tuple(s.shape)}")
            k = 3
        if self.expose_hidden:
            want = (1, n, self.param.recurrent_param.num_output)
            for s, b in zip(self.states, bottoms[k:]):
                if tuple(b.shape) != want:
                    raise self.error(f"bottom {s}_0 must have shape {want} (1, streams, num_output), "
                                     f"got {tuple(b.shape)}")
        return t, n

    def setup(self, bottoms):
        p = self.param.recurrent_param
        if p.num_output <= 0:
            raise self.error(f"recurrent_param.num_output must be positive, got {p.num_output}")
        self._check(bottoms)
        x = bottoms[0]
        input_dim = x[0, 0].numel()
        static_dim = bottoms[2][0].numel() if self.has_static else None
        self._add_blobs(p, self.gates * p.num_output, input_dim, static_dim)

    def _add_blobs(self, p, rows: int, input_dim: int, static_dim: int | None) -> None:
        raise NotImplementedError

    def _initial_state(self, bottoms: list[torch.Tensor], n: int) -> list[torch.Tensor]:
        x = bottoms[0]
        if self.expose_hidden:
            # Caffe shares only the data of h_0 (c_0) with its unrolled net: they get no diff
            return [b.detach().reshape(n, -1) for b in bottoms[-len(self.states):]]
        zeros = x.new_zeros(n, self.param.recurrent_param.num_output)
        carried = self._carried
        if carried is None or carried[0].shape != zeros.shape:
            return [zeros] * len(self.states)
        return [s.to(x.dtype) for s in carried]

    def _input_projection(self, bottoms: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                          static_weight: torch.Tensor | None) -> torch.Tensor:
        """W x_t + b for all timesteps at once (T x N x rows), plus W_static x_static if given."""
        x = bottoms[0]
        t, n = x.shape[0], x.shape[1]
        proj = torch.addmm(bias.to(x.dtype), x.reshape(t * n, -1), weight.to(x.dtype).t()).view(t, n, -1)
        if static_weight is not None:
            s = bottoms[2]
            proj = proj + (s.reshape(n, -1) @ static_weight.to(x.dtype).t())
        return proj

    def _run(self, bottoms: list[torch.Tensor], state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(output T x N x D, final state as N x D tensors)."""
        raise NotImplementedError

    def forward(self, bottoms):
        _, n = self._check(bottoms)
        state = self._initial_state(bottoms, n)
        out, final = self._run(bottoms, state)
        if not self.expose_hidden:
            self._carried = [s.detach() for s in final]
            return [out]
        # Caffe shares only the data of the h_T (c_T) tops: diffs set on them go nowhere
        return [out] + [s.detach().unsqueeze(0) for s in final]

    def infer_tops(self, bottoms):
        t, n = self._check(bottoms)
        shape = (t, n, self.param.recurrent_param.num_output)
        extra = len(self.states) if self.expose_hidden else 0
        x = bottoms[0]
        return [x.new_zeros(shape)] + [x.new_zeros((1,) + shape[1:]) for _ in range(extra)]


@register
class RNN(_Recurrent):
    """Caffe's RNN layer: h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_x_static x_static]),
    o_t = tanh(W_ho h_t + b_o); the top is o (T x N x num_output)."""

    type = "RNN"
    states = ("h",)

    def _add_blobs(self, p, rows, input_dim, static_dim):
        self.add_blob((rows, input_dim), p.weight_filler)  # W_xh
        self.add_blob((rows,), p.bias_filler)  # b_h
        if static_dim is not None:
            self.add_blob((rows, static_dim), p.weight_filler)  # W_x_static
        self.add_blob((rows, p.num_output), p.weight_filler)  # W_hh
        self.add_blob((p.num_output, p.num_output), p.weight_filler)  # W_ho
        self.add_blob((p.num_output,), p.bias_filler)  # b_o

    def _run(self, bottoms, state):
        x, cont = bottoms[0], bottoms[1].detach().to(bottoms[0].dtype)
        w_xh, b_h, *w_static, w_hh, w_ho, b_o = (b.to(x.dtype) for b in self.blobs)
        proj = self._input_projection(bottoms, w_xh, b_h, w_static[0] if w_static else None)
        (h,) = state
        w_hh_t = w_hh.t()
        hs = []
        for t in range(x.shape[0]):
            # Caffe scales h_{t-1} by cont_t before the recurrent product
            h = torch.tanh(proj[t] + (cont[t].unsqueeze(1) * h) @ w_hh_t)
            hs.append(h)
        hidden = torch.stack(hs)
        out = torch.tanh(hidden @ w_ho.t() + b_o)
        return out, [h]


@register
class LSTM(_Recurrent):
    """Caffe's LSTM layer: gates W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_x_static x_static] in
    the order i, f, o, g feed an LSTMUnit step; the top is h (T x N x num_output)."""

    type = "LSTM"
    states = ("h", "c")
    gates = 4

    def _add_blobs(self, p, rows, input_dim, static_dim):
        self.add_blob((rows, input_dim), p.weight_filler)  # W_xc
        self.add_blob((rows,), p.bias_filler)  # b_c
        if static_dim is not None:
            self.add_blob((rows, static_dim), p.weight_filler)  # W_x_static
        self.add_blob((rows, p.num_output), p.weight_filler)  # W_hc

    def _run(self, bottoms, state):
        x, cont = bottoms[0], bottoms[1].detach().to(bottoms[0].dtype)
        w_xc, b_c, *w_static, w_hc = (b.to(x.dtype) for b in self.blobs)
        proj = self._input_projection(bottoms, w_xc, b_c, w_static[0] if w_static else None)
        h, c = state
        w_hc_t = w_hc.t()
        hs = []
        for t in range(x.shape[0]):
            ct = cont[t].unsqueeze(1)
            c, h = _lstm_step(c, proj[t] + (ct * h) @ w_hc_t, ct)
            hs.append(h)
        return torch.stack(hs), [h, c]


@register
class LSTMUnit(Layer):
    """Caffe's LSTMUnit layer: one LSTM step. Bottoms c_prev (1 x N x D), gate inputs (1 x N x 4D,
    order i, f, o, g), cont (1 x N); tops c (1 x N x D), h (1 x N x D)."""

    type = "LSTMUnit"
    min_bottoms = max_bottoms = 3
    min_tops = max_tops = 2
    # Caffe's LSTMUnitLayer::AllowForceBackward: no diff to cont (bottom 2)
    allow_force_backward = (True, True, False)

    def setup(self, bottoms):
        self._check(bottoms)

    def _check(self, bottoms: list[torch.Tensor]) -> None:
        c_prev, gates, cont = bottoms
        n = c_prev.shape[1] if c_prev.dim() == 3 else None
        for i, (what, b, axes) in enumerate((("c_prev", c_prev, 3), ("gate input", gates, 3), ("cont", cont, 2))):
            if b.dim() != axes or b.shape[0] != 1 or (n is not None and b.shape[1] != n):
                dims = "(1, N, ...)" if axes == 3 else "(1, N)"
                raise self.error(f"bottom {i} ({what}) must have {axes} axes {dims} with N = {n} streams, "
                                 f"got shape {tuple(b.shape)}")
        if gates.shape[2] != 4 * c_prev.shape[2]:
            raise self.error(f"bottom 1 (gate input) must have 4 x {c_prev.shape[2]} = {4 * c_prev.shape[2]} "
                             f"values per stream (i, f, o, g for each of bottom 0's), got {gates.shape[2]}")

    def forward(self, bottoms):
        self._check(bottoms)
        c_prev, gates, cont = bottoms
        c, h = _lstm_step(c_prev, gates, cont.detach().to(c_prev.dtype).unsqueeze(2))
        return [c, h]
