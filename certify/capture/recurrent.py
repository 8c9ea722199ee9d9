"""Recurrent layers unrolled over the fixed sequence length of the example input:
``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (tanh or relu; ``aten.lstm``, ``aten.gru``,
``aten.rnn_tanh``, ``aten.rnn_relu``: any ``num_layers``, bidirectional or not, with or
without biases, ``batch_first`` either way) and their cells (``aten.lstm_cell``, ...), one
call per step of a Python loop. THEORY.md section 8: every step is the nodes it computes,
in torch's formulas, with ``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` cut into blocks
of the hidden size ``H``:

    LSTM   i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of the four blocks of a_t,
           c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t);
    GRU    r, z = sigmoid of the first two blocks of a_t,
           n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn)),   h_t = n + z * (h_{t-1} - n);
    RNN    h_t = tanh(a_t) or relu(a_t):

``Slice`` nodes for the blocks, ``Activation`` nodes for the gates, ``Product`` nodes for a
gate times a moving tensor, ``Add`` for sums (``ScaleShift`` where one operand is a constant:
a step from the initial state). A reverse direction runs from the last step to the first;
its outputs are concatenated after the forward ones, as torch does.

Which weights are certified. ``W_ih`` of a layer (and direction) reads the whole input
sequence, known before the recurrence runs: it is one ``Affine`` node over the ``T``
positions (a dense layer over a sequence, ``T`` columns: THEORY.md section 2), named after
the parameter (``rnn.weight_ih_l0``, ``rnn.weight_ih_l0_reverse``), so its radius is that of
the parameter, every step perturbed by the same change. ``W_hh`` reads ``h_{t-1}``, which
its own earlier uses computed: each step needs its own node, and a certificate of one node
(one use) says nothing of a change of the weight, which moves every step at once. Such
uses are ``FixedAffine`` nodes, not certified (``Build.recurrent``: a weight with several
uses, the steps from a constant initial state or with a bias counted); so are the weights of
a cell called at every step of a loop. A weight with one use (a cell called once) stays a
certified layer.

Initial states: zeros (the default), a constant that is the same for every input of the
batch (a learned state expanded over it), or the final states of another recurrent layer
(``Leading`` values, ``certify.capture.time_major``). Refused by name: packed sequences,
dropout between layers in training mode, ``proj_size``.
"""

from __future__ import annotations

import torch

from certify.capture.build import Build, Const, Leading, Ref, UnsupportedModelError
from certify.capture.operands import _const, _zeros
from certify.capture.time_major import cut, whole
from certify.graph.operators import Activation, Add, Affine, Cat, Product, ScaleShift, Slice

aten = torch.ops.aten

SUPPORTED = ("nn.LSTM, nn.GRU, nn.RNN (tanh, relu) on padded tensors (batch_first True or "
             "False, any num_layers, bidirectional, with or without biases, initial states "
             "zero, constant or another layer's final states) and LSTMCell, GRUCell, "
             "RNNCell")
BLOCKS = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_ONE = torch.ones((), dtype=torch.float64)


# ------------------------------------------------------------------- a node or a constant
# Values in a step are nodes (``Ref``) or constants per input (tensors): the initial state.


def _add(b: Build, fx, name, u, v, shape, alpha: float = 1.0):
    """``u + alpha v`` where one of them is a node: a new node, or the node itself where the
    other operand is a zero constant (``0 + alpha v`` only when ``alpha`` is 1)."""
    if isinstance(u, Ref) and isinstance(v, Ref):
        return b.node(Add(alpha), [u, v], fx, name, shape)
    if isinstance(u, Ref):
        return u if not v.any() else \
            b.node(ScaleShift(_ONE, alpha * v), [u], fx, name, shape)
    if not u.any() and alpha == 1.0:
        return v
    return b.node(ScaleShift(alpha * _ONE, u), [v], fx, name, shape)


def _mul(b: Build, fx, name, u, v, shape):
    """``u * v``: a ``Product`` of two nodes, a ``ScaleShift`` by a constant (zero: the
    constant itself)."""
    if isinstance(u, Ref) and isinstance(v, Ref):
        return b.node(Product(), [u, v], fx, name, shape)
    node, scale = (u, v) if isinstance(u, Ref) else (v, u)
    return torch.zeros_like(scale) if not scale.any() else \
        b.node(ScaleShift(scale, torch.zeros_like(scale)), [node], fx, name, shape)


def _block(b: Build, fx, name, v, k: int, H: int):
    """Block ``k`` (entries ``kH`` to ``(k + 1) H``) of a node or a constant."""
    if isinstance(v, Ref):
        return b.node(Slice(0, k * H, (k + 1) * H), [v], fx, name, (H,))
    return v[k * H:(k + 1) * H]


def _act(b: Build, fx, name, kind: str, v: Ref, H: int) -> Ref:
    return b.node(Activation(kind), [v], fx, name, (H,))


# ------------------------------------------------------------------- one step


def _hidden(b: Build, fx, name, h, W_hh: Const, b_hh: torch.Tensor, biased: bool):
    """``W_hh h + b_hh``: a node for a computed ``h`` (``Build.recurrent``), else a
    constant, which still counts as a use of the weight where it depends on it (a nonzero
    state, or a bias)."""
    op = Affine(W_hh.value, b_hh)
    if isinstance(h, Ref):
        return b.recurrent(op, h, fx, W_hh, W_hh.source or name, (len(b_hh),))
    if biased or h.any():
        b.recurrent(op, None, fx, W_hh, W_hh.source or name, (len(b_hh),))
    return op.weight @ h + b_hh


def _step(b: Build, fx, name, kind, gx: Ref, h, c, W_hh, b_hh, biased):
    """``h_t`` (and ``c_t`` for the LSTM) from ``gx = W_ih x_t + b_ih`` and the state."""
    H = W_hh.value.shape[1]
    gh = _hidden(b, fx, f"{name}/hh", h, W_hh, b_hh, biased)
    if kind == "gru":
        r, z = (_act(b, fx, f"{name}/{gate}", "sigmoid",
                     _add(b, fx, f"{name}/{gate}_in", _block(b, fx, f"{name}/x_{gate}", gx, k, H),
                          _block(b, fx, f"{name}/h_{gate}", gh, k, H), (H,)), H)
                for k, gate in enumerate("rz"))
        reset = _mul(b, fx, f"{name}/r_h", r, _block(b, fx, f"{name}/h_n", gh, 2, H), (H,))
        n = _act(b, fx, f"{name}/n", "tanh",
                 _add(b, fx, f"{name}/n_in", _block(b, fx, f"{name}/x_n", gx, 2, H), reset,
                      (H,)), H)
        change = _add(b, fx, f"{name}/h-n", h, n, (H,), alpha=-1.0)
        return _add(b, fx, f"{name}/h", n, _mul(b, fx, f"{name}/z_dh", z, change, (H,)),
                    (H,)), None
    a = _add(b, fx, f"{name}/gates", gx, gh, (BLOCKS[kind] * H,))
    if kind != "lstm":
        return _act(b, fx, f"{name}/h", kind[4:], a, H), None
    i, f, g, o = (_act(b, fx, f"{name}/{gate}", "tanh" if gate == "g" else "sigmoid",
                       _block(b, fx, f"{name}/{gate}_in", a, k, H), H)
                  for k, gate in enumerate("ifgo"))
    c = _add(b, fx, f"{name}/c", _mul(b, fx, f"{name}/f_c", f, c, (H,)),
             _mul(b, fx, f"{name}/i_g", i, g, (H,)), (H,))
    return _mul(b, fx, f"{name}/h", o, _act(b, fx, f"{name}/tanh_c", "tanh", c, H), (H,)), c


# ------------------------------------------------------------------- the operators


def _prefix(fx, params) -> str:
    """The module's path, from its first weight's name (``rnn.weight_ih_l0`` gives
    ``rnn``), else the node's name."""
    source = getattr(params[0], "source", None) or ""
    return source.rsplit(".", 1)[0] if "." in source else fx.name


def _states(b: Build, fx, where, value, what: str) -> list:
    """An initial state ``(layers x directions, B, H)`` as one value per layer and
    direction: constant vectors (the same for every input of the batch) or nodes (another
    recurrent layer's final states)."""
    if isinstance(value, Leading):
        return list(value.parts)
    if isinstance(value, Ref) and value.axis == 1:  # transposed by the model: (K, B, H)
        return list(cut(b, fx, Ref(value.index)).parts)
    if isinstance(value, Ref):
        raise UnsupportedModelError(
            f"{fx.name}: the initial {what} has the batch as its first axis, which the layer "
            f"reads as layers x directions ({where}); it must be (layers x directions, batch, "
            "hidden): transpose(0, 1) it")
    state = value.value.to(torch.float64)
    if not torch.equal(state, state[:, :1].expand_as(state)):
        raise UnsupportedModelError(
            f"{fx.name}: the initial {what} is a constant that differs between the inputs of "
            f"the batch ({where}); supported: zeros, a constant the same for every input, "
            "or another recurrent layer's final states")
    return list(state[:, 0])


def _sequence(kind: str):
    def rule(b: Build, fx, where, *args):
        if fx.target._overloadname == "data":
            raise UnsupportedModelError(
                f"{fx.name}: a packed sequence (nn.utils.rnn.pack_padded_sequence) ({where}); "
                f"supported: {SUPPORTED}, unrolled over the example's fixed length")
        x, hx, params, biased, layers, dropout, train, bidirectional, batch_first = args
        if train:
            raise UnsupportedModelError(f"{fx.name}: a recurrent layer in training mode "
                                        f"(dropout={dropout} between layers) ({where})")
        D = 2 if bidirectional else 1
        per = 4 if biased else 2
        if len(params) != layers * D * per:  # an LSTM's projection weights come fifth
            raise UnsupportedModelError(
                f"{fx.name}: an LSTM with proj_size ({where}); supported: {SUPPORTED}")
        time_major = isinstance(x, Leading) or (isinstance(x, Ref) and x.axis == 1)
        if batch_first == time_major or (isinstance(x, Ref) and x.axis > 1):
            raise UnsupportedModelError(
                f"{fx.name}: batch_first={batch_first} reads axis {1 - batch_first} as the "
                f"batch, but the batch is axis {int(batch_first)} here ({where}); give the "
                "recurrent layer (batch, time, features) with batch_first=True, or "
                "x.transpose(0, 1) with batch_first=False")
        params = [_const(p, fx, "a recurrent weight") for p in params]
        H = params[1].value.shape[1]
        lstm = kind == "lstm"
        hs = _states(b, fx, where, hx[0] if lstm else hx, "hidden state")
        cs = _states(b, fx, where, hx[1], "cell state") if lstm else [None] * (layers * D)
        prefix = _prefix(fx, params)
        # (T, features) per input; the model's own transpose of a batch-first tensor moved
        # only its batch axis (Ref.axis), so its node already is that.
        seq = whole(b, x, fx, f"{prefix}/input") if isinstance(x, Leading) else Ref(x.index)
        b.at = 0  # every node below is given its per-input shape, the batch first
        T = b.nodes[seq.index].shape[0]
        finals, cells = [], []
        for layer in range(layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                W_ih, W_hh, *bias = params[k * per:(k + 1) * per]
                G = W_ih.value.shape[0]
                b_ih, b_hh = (bias[0].value, bias[1].value) if biased else (_zeros(G), _zeros(G))
                path = f"{prefix}/l{layer}{'_reverse' if d else ''}"
                gx_all = b.affine(Affine(W_ih.value, b_ih), seq, fx, W_ih, (T, G))
                h, c = hs[k], cs[k]
                out = [None] * T
                for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
                    name = f"{path}/t{t}"
                    gx = b.node(Slice(0, index=t), [gx_all], fx, f"{name}/ih", (G,))
                    h, c = _step(b, fx, name, kind, gx, h, c, W_hh, b_hh, biased)
                    out[t] = h
                finals.append(h)
                cells.append(c)
                outs.append(b.node(Cat(0, T, stack=True), out, fx, f"{path}/out", (T, H)))
            seq = outs[0] if D == 1 else b.node(Cat(1, 2), outs, fx, f"{prefix}/l{layer}/out",
                                                (T, 2 * H))
        output = seq if batch_first else Leading(
            tuple(b.node(Slice(0, index=t), [seq], fx, f"{prefix}/out/t{t}", (D * H,))
                  for t in range(T)), seq)
        if lstm:
            return output, Leading(tuple(finals)), Leading(tuple(cells))
        return output, Leading(tuple(finals))
    return rule


def _cell_state(fx, where, value, what: str):
    """A cell's state ``(B, H)``: a node, or a constant the same for every input."""
    if isinstance(value, Ref):
        return value
    state = value.value.to(torch.float64) if isinstance(value, Const) else None
    if state is None or not torch.equal(state, state[:1].expand_as(state)):
        raise UnsupportedModelError(
            f"{fx.name}: the cell's {what} is neither a batch-first tensor computed from the "
            f"input nor a constant the same for every input ({where})")
    return state[0]


def _cell(kind: str):
    def rule(b: Build, fx, where, x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        if not isinstance(x, Ref):
            raise UnsupportedModelError(f"{fx.name}: a recurrent cell on a constant input "
                                        f"({where}); supported: (batch, features) computed "
                                        "from the input")
        W_ih, W_hh = _const(w_ih, fx, "the weight_ih"), _const(w_hh, fx, "the weight_hh")
        G = W_ih.value.shape[0]
        biased = b_ih is not None or b_hh is not None
        b_ih, b_hh = (_zeros(G) if v is None else _const(v, fx, "a recurrent bias").value
                      for v in (b_ih, b_hh))
        prefix = _prefix(fx, [W_ih])
        lstm = kind == "lstm"
        h = _cell_state(fx, where, hx[0] if lstm else hx, "hidden state")
        c = _cell_state(fx, where, hx[1], "cell state") if lstm else None
        gx = b.recurrent(Affine(W_ih.value, b_ih), x, fx, W_ih, W_ih.source or fx.name, (G,))
        h, c = _step(b, fx, prefix, kind, gx, h, c, W_hh, b_hh, biased)
        return (h, c) if lstm else h
    return rule


RULES = {**{getattr(aten, kind): _sequence(kind) for kind in BLOCKS},
         **{getattr(aten, f"{kind}_cell"): _cell(kind) for kind in BLOCKS}}
