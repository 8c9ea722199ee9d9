"""Model capture: any ``torch.nn.Module`` becomes a ``certify.graph.graph.Graph`` through
``torch.export`` (THEORY.md section 8).

Every source (a module, a ``.pt2`` archive, ONNX converted by onnx2torch, a state dict with
its factory: ``certify.formats.loading``) ends here the same way: a float64 copy of the module is
exported with an example batch, and the ATen graph is read node by node (``certify.capture.aten``
maps each ATen operator to a ``certify.graph.operators`` operator). Nodes computed from parameters
and constants alone are evaluated (constant folding), so ``addmm(b, x, permute(W))`` is a
dense layer with weight ``W``; a batch norm right after an affine layer is folded into it;
softmax and log-softmax at the output are dropped (they keep the argmax, and log-softmax the
margins). ``nn.MultiheadAttention`` is exported through a batch-first forward on its own
parameters (``certify.capture.attention``). The graph is checked against the module (its own
forward) on the example batch.

Shapes are read from the export (``node.meta["val"]``) and stored per input, without the
batch axis, so the graph runs on any batch size; operations that mix the batch axis are
refused. Anything unsupported raises ``UnsupportedModelError`` naming the operator, where it
comes from (module path, source line) and what is supported.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import torch
from torch import nn

from certify.capture.aten import (BUILDERS, IDENTITIES, MASK_USERS, MOVABLE, SUPPORTED,
                                  TIME_MAJOR_USERS)
from certify.capture.attention import refused, rewritten
from certify.capture.build import Build, Masked, Norm, Ref, Tail, UnsupportedModelError
from certify.capture.time_major import refuse
from certify.capture.transformers import NORM_USERS
from certify.graph.graph import Graph, Node

__all__ = ["UnsupportedModelError", "capture", "SUPPORTED"]

EXAMPLE_BATCH = 2


def capture(module: nn.Module, example) -> Graph:
    """The graph of ``module`` in float64, for inputs shaped like ``example``.

    ``example``: a batch of inputs (a tensor or array, ``(B, *shape)``) or the shape of one
    input (a tuple of ints). The module is not changed: a float64 copy is exported in eval
    mode. Raises ``certify.graph.inputs.InputTypeError`` (a ``TypeError``) for a non-module,
    ``UnsupportedModelError`` for operations certify cannot reason about and
    ``certify.graph.inputs.InputError`` (a ``ValueError``) for NaN or Inf parameters or buffers or a
    bad ``example``.
    """
    from certify.graph.inputs import InputError, InputTypeError, require_finite

    if not isinstance(module, nn.Module):
        raise InputTypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    shape = _example_shape(example, InputError)
    _refuse_modules(module)
    require_finite(list(module.named_parameters()) + list(module.named_buffers()),
                   f"the model ({type(module).__name__})")
    copied = float64_copy(module)
    x = torch.randn(_export_batch(module), *shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    try:
        with _quiet(), rewritten(copied):
            program = torch.export.export(copied, (x,), strict=False)
    except UnsupportedModelError:
        raise
    except Exception as err:  # export raises many types (data-dependent control flow, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UnsupportedModelError(
            f"torch.export cannot capture {type(module).__name__} for inputs of shape "
            f"{shape} ({type(err).__name__}: {first[:300]}); certify needs a model that "
            "torch.export.export(model, (x,)) accepts: no data-dependent Python control flow, "
            "one tensor input, one tensor output") from None
    _refuse_data_dependent_shapes(program)
    graph, tails = _read(program, len(x))
    with torch.no_grad():
        expected = copied(x)
        got = graph(x)
        for tail in tails:  # what the graph leaves out after the logits
            got = tail(got)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or \
            not _reproduces(got, expected.to(got.dtype)):
        raise UnsupportedModelError(
            f"the captured graph of {type(module).__name__} does not reproduce the module on "
            "an example batch (an operator certify reads differently from torch); please "
            "report it with the model")
    return graph


def _reproduces(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float64 rounding, which scales with the size of each input's logits, in
    every entry, also the small ones, and grows with depth (EfficientNet-B7 with calibrated
    batch norms: its logits move by 4e-8 of their size when its input moves by 1e-15 of its
    own): ``|got - expected| <= 1e-6 (max_j |expected_j| + 1)`` per input. An operator read
    wrongly moves them by far more (``tests/capture/test_reproduction_check.py``)."""
    scale = expected.abs().flatten(1).amax(dim=1).reshape(-1, *[1] * (expected.ndim - 1))
    return bool(((got - expected).abs() <= 1e-6 * (scale + 1)).all())


def _refuse_modules(module: nn.Module) -> None:
    """Modules refused before export, with what to do instead. Embedding lookups take
    integer tokens, which no weight perturbation bound speaks of: the embedded vectors are
    the input of the network certify reads. ``nn.MultiheadAttention`` is exported through
    ``certify.capture.attention``, which refuses a few of its options."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            raise UnsupportedModelError(
                f"module {name!r} ({type(m).__name__}) looks up integer tokens; certify "
                "treats embeddings as inputs: certify the module that runs after the lookup, "
                "on the embedded float vectors (see certify.models.minilm for a BERT split this way)")
        why = refused(name, m) if isinstance(m, nn.MultiheadAttention) else None
        if why:
            raise UnsupportedModelError(why)


def float64_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` in eval mode (the caller's module is not changed)."""
    try:
        with _quiet():
            copied = copy.deepcopy(module)
    except Exception as err:  # deepcopy fails in as many ways as objects can refuse it
        raise UnsupportedModelError(
            f"cannot copy the {type(module).__name__} ({type(err).__name__}: {err}); certify "
            "exports a float64 copy so as not to change your module: make it copyable") from None
    copied = copied.to(torch.float64)
    for m in copied.modules():  # eval() is refused by torch.export modules; the flag is enough
        m.training = False
    return copied


@contextlib.contextmanager
def _quiet():
    """Silence torch's logging of the errors that ``capture`` reports itself, and its
    deprecation warnings about its own internals."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _example_shape(example, InputError) -> tuple[int, ...]:
    if isinstance(example, tuple) and all(isinstance(n, int) and n > 0 for n in example):
        return example
    try:
        t = torch.as_tensor(example)
    except Exception:
        raise InputError(f"example must be a batch of inputs (B, *shape) or the shape of one "
                         f"input (a tuple of positive ints), got {type(example).__name__}") from None
    if t.ndim < 2 or t.shape[0] < 1 or 0 in t.shape:
        raise InputError(f"example must be a non-empty batch (B, *shape), got shape "
                         f"{tuple(t.shape)}; pass the shape of one input as a tuple instead")
    return tuple(t.shape[1:])


def _export_batch(module: nn.Module) -> int:
    """The batch size to export with: a program already exported (a ``.pt2`` archive's
    module) may hold its batch size in its operations (``x.reshape(len(x), -1)``), so it is
    exported again at that size; any other module at ``EXAMPLE_BATCH``."""
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            val = node.meta.get("val") if node.op == "placeholder" else None
            if isinstance(val, torch.Tensor) and val.ndim > 0 and isinstance(val.shape[0], int):
                return val.shape[0]
    return EXAMPLE_BATCH


def _refuse_data_dependent_shapes(program) -> None:
    """The export runs on inputs of one fixed shape, so every size in it is an integer unless
    it was computed from the values of a tensor (``.tolist()``, ``.item()``: what onnx2torch
    does with a shape, axes or pad amounts computed in the ONNX graph); such a size is a
    symbol, which the graph cannot be read with."""
    for fx in program.graph.nodes:
        val = fx.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else [val]:
            if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
                raise UnsupportedModelError(
                    f"{_name(fx.target)} gives a tensor whose shape depends on the values of "
                    f"a tensor ({_where(fx)}: shape {tuple(v.shape)}); certify needs every "
                    "size fixed by the input shape: compute sizes from constants or from "
                    "x.shape, not from tensor values")


def _read(program, batch: int) -> Graph:
    """The graph of an exported program (``torch.export.ExportedProgram``)."""
    signature = program.graph_signature
    state = {**program.state_dict, **program.constants}
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
             **signature.inputs_to_lifted_tensor_constants}
    user_inputs = list(signature.user_inputs)
    if len(user_inputs) != 1:
        raise UnsupportedModelError(f"the model takes {len(user_inputs)} inputs; certify needs "
                                    "exactly one input tensor")
    build = Build(batch=batch)
    env: dict = {}
    for fx in program.graph.nodes:
        if fx.op == "placeholder":
            if fx.name in user_inputs:
                env[fx] = build.add(Node("input", None, (), tuple(fx.meta["val"].shape[1:])))
            else:
                fqn = names.get(fx.name, fx.name)
                value = state[fqn].detach()
                env[fx] = build.constant(value.to(torch.float64, copy=True)
                                         if value.is_floating_point() else value.clone(), fqn)
        elif fx.op == "call_function":
            env[fx] = _call(build, fx, env)
        elif fx.op == "output":
            outputs = fx.args[0]
            if len(outputs) != 1 or not build.is_output(env.get(outputs[0])):
                raise UnsupportedModelError("the model must return exactly one tensor computed "
                                            "from its input (the logits)")
            return build.finish(env[outputs[0]]), build.tails
        else:
            raise UnsupportedModelError(f"{fx.op} node {fx.name} in the exported graph")
    raise UnsupportedModelError("the exported graph has no output")


def _call(build: Build, fx, env):
    args = torch.fx.node.map_arg(fx.args, lambda n: env[n])
    kwargs = torch.fx.node.map_arg(fx.kwargs, lambda n: env[n])
    target = fx.target
    if not build.depends(args, kwargs):
        return build.fold(target, args, kwargs, fx)
    where = _where(fx)
    packet = getattr(target, "overloadpacket", target)
    if packet in IDENTITIES or target in IDENTITIES:
        return args[0]
    rule = BUILDERS.get(packet, BUILDERS.get(target))
    if rule is None:
        raise UnsupportedModelError(
            f"{_name(target)} is not supported ({where}); supported operators: {SUPPORTED}")
    if packet not in TIME_MAJOR_USERS and build.time_major(args, kwargs):
        raise refuse(fx, where, _name(target))
    # A softmax used here becomes a node; a vector norm may only go on to F.normalize, a
    # mask only to a softmax (``inside`` refuses them anywhere else).
    args = torch.fx.node.map_aggregate(
        args, lambda v: build.inside(v, where) if isinstance(v, Tail) or
        (isinstance(v, Norm) and packet not in NORM_USERS) or
        (isinstance(v, Masked) and packet not in MASK_USERS) else v)
    build.at = _batch_axis(args, kwargs, fx, where)
    if build.at and packet not in MOVABLE:
        raise UnsupportedModelError(
            f"{_name(target)} of a tensor whose batch axis a transpose moved to position "
            f"{build.at} ({where}); certify follows a moved batch axis through reshapes, "
            "transposes, slices, cat, elementwise arithmetic and activations, linear layers, "
            "layer norm, softmax and attention: move it back to the front first")
    return rule(build, fx, where, *args, **kwargs)


def _batch_axis(args, kwargs, fx, where) -> int:
    """Where the computed operands hold the batch axis (the same for all of them)."""
    axes = set()

    def see(v):
        ref = v.ref if isinstance(v, (Masked, Norm, Tail)) else v
        if isinstance(ref, Ref):
            axes.add(ref.axis)
        return v

    torch.fx.node.map_aggregate((args, kwargs), see)
    if len(axes) > 1:
        raise UnsupportedModelError(
            f"{fx.name}: operands with the batch axis at different positions {sorted(axes)} "
            f"({where}); transpose them alike first")
    return axes.pop() if axes else 0


def _name(target) -> str:
    return str(getattr(target, "__name__", target)).replace("aten::", "aten.")


def _where(fx) -> str:
    """Where a node comes from: module path and type, and the source line."""
    parts = []
    stack = fx.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1]
        kind = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1]
        parts.append(f"module {path!r} ({kind})" if path else f"the model's forward ({kind})")
    trace = fx.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines()]
    files = [line for line in lines if line.startswith("File ")]
    # The innermost frame outside torch itself: the user's line.
    files = [line for line in files if "/site-packages/torch/" not in line] or files
    if files:
        code = lines[lines.index(files[-1]) + 1] if lines.index(files[-1]) + 1 < len(lines) else ""
        parts.append(f"{files[-1][5:]}: {code}" if code else files[-1][5:])
    return ", ".join(parts) or f"node {fx.name}"
