"""Write a copy of a model file, in its own format, with new weights for some certified layers.

``write_weights`` copies a ``.onnx``, ``.pt2``, ``.safetensors``, ``.pt`` or ``.pth`` file
with the tensors behind the named layers of its graph replaced, so that certify, reading the
copy, finds the requested weight matrices (rounded to the file's dtype). A graph's weight is
not always a tensor of the file as it stands, so each layer's tensor is found by value, in one
of these layouts:

* as is;
* transposed: a dense layer stored ``(n, m)`` (an ONNX ``MatMul`` initializer);
* swapped: a transposed convolution, whose graph weight is the kernel of the convolution it
  equals (``certify.graph.operators.affine.swap_kernel``);
* any of these scaled per output channel: a batch norm folded into the layer
  (``fold_batchnorm``): the new weight is divided by the factor before it is written; an
  output channel the factor (or the file) zeroes can only stay zero.

ONNX initializers and ``Constant`` nodes are searched, a ``.pt2`` archive's parameters,
buffers and constants (the archive vetted first, ``certify.formats.pt2``), a state dict's
entries; an ONNX file's external data is written to one file beside the copy
(``copy.onnx.data`` for ``copy.onnx``). Refused, with the layer named: a layer to change whose weight is no single
tensor of the file (computed from several, as in weight normalisation; a one-input layer with
a folded batch norm, whose factor no value can tell), several tensors or layouts that fit, and
a tensor that another layer reads too.

The copy is read again by the caller's ``reload`` (``certify.capture`` sits beside this
stage, so the caller passes it) and checked: the changed layers hold the new weights, all
others their old weights and biases bit for bit; a copy that fails is not kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from certify.formats.errors import ModelLoadError, first_line
from certify.formats.loading import SUPPORTED_SUFFIXES
from certify.formats.onnx.files import onnx_external_files
from certify.formats.pt2 import load_pt2_program
from certify.formats.state_dicts import _load_state_dict_file
from certify.graph.graph import Graph
from certify.graph.inputs import InputError, brief
from certify.graph.operators.affine import Affine, swap_kernel

__all__ = ["write_weights"]

# A folded factor is applied in float64: the folded weight matches the file tensor times the
# factor to a few units in the last place.
_FOLD_RTOL = 1e-12


@dataclass(frozen=True)
class _File:
    """A model file's tensors by name, and how to save it with some of them replaced
    (``save(replaced, out)`` returns the files it wrote)."""

    tensors: dict[str, torch.Tensor]
    save: Callable[[dict[str, torch.Tensor], Path], list[Path]]


@dataclass(frozen=True)
class _Site:
    """Where a layer's weight lives: file tensor ``key`` in ``layout``, times ``scale`` per
    output channel (a folded batch norm; NaN where the file's channel is zero), or not scaled
    (``None``)."""

    key: str
    layout: str  # "as is", "transposed" or "swapped"
    scale: torch.Tensor | None


def write_weights(source: str | Path, network: Graph, weights: Mapping[str, torch.Tensor],
                  out: str | Path, *, reload: Callable[[Path], Graph]) -> Graph:
    """Write a copy of the model file ``source`` to ``out`` (same format) in which layer
    ``name`` of ``network`` has weight ``weights[name]``; return the copy's graph, read again.

    ``network``: the graph certify read from ``source``. ``weights``: new weights by layer
    name, each shaped like the layer's weight matrix ``(m, n)`` or its kernel; layers not
    named keep theirs. The file's dtype rounds them: the copy's layer holds ``weights[name]``
    rounded to it (float32 for a float32 file) where the file stores the weight itself, and
    ``weights[name]`` to within ``4 eps`` of the dtype per entry where it stores the weight
    divided by a folded batch norm's factor. ``reload``: how the
    caller reads a file into a graph, as it read ``network``, e.g.
    ``lambda path: capture(load_model(path), network.input_shape)``
    (``certify.capture.export.capture``, ``certify.formats.loading.load_model``).

    Raises ``certify.graph.inputs.InputError`` (a ``ValueError``) for a name that is no layer,
    a wrong shape or non-finite weights, and ``ModelLoadError`` for a file whose weights
    cannot be written (see the module) or whose copy does not read back as asked.
    """
    source, out = Path(source), Path(out)
    suffix = _checked_paths(source, out)
    new = _new_weights(network, weights)
    file = _read_onnx(source) if suffix == ".onnx" else (
        _read_pt2(source) if suffix == ".pt2" else _read_state_dict(source))
    sites = _sites(network, file.tensors, source.name, new)
    layers = dict(zip(network.layer_names, map(network.layer, network.affine_indices)))
    replaced = {sites[name].key: _file_value(name, layers[name], sites[name],
                                             file.tensors[sites[name].key], value)
                for name, value in new.items()}
    try:
        written = file.save(replaced, out)
    except OSError as exc:
        raise ModelLoadError(f"cannot write {out}: {first_line(exc)}") from None
    try:
        graph = reload(out)
        _check(network, graph, new, sites, file.tensors, out)
    except BaseException:
        for path in written:  # an unchecked copy is not left behind
            path.unlink(missing_ok=True)
        raise
    return graph


def _checked_paths(source: Path, out: Path) -> str:
    """The source's suffix, once ``source`` is a model file certify writes and ``out`` another
    path of the same format."""
    suffix = source.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ModelLoadError(
            f"cannot write weights into {source.name}: certify writes the formats it reads, "
            f"{', '.join(SUPPORTED_SUFFIXES)}")
    if out.suffix.lower() != suffix:
        raise ModelLoadError(f"cannot write {out.name}: the copy of {source.name} keeps its "
                             f"format: name it with {suffix}")
    if not source.is_file():
        raise ModelLoadError(f"model file not found: {source} (check the path)")
    if out.exists() and out.samefile(source):
        raise ModelLoadError(f"{out} is the model file itself: write the copy to another path")
    return suffix


def _new_weights(network: Graph, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` as float64 tensors shaped like the layers' weights, checked."""
    names = network.layer_names
    if not isinstance(weights, Mapping):
        raise InputError(f"weights must map layer names to tensors, got {type(weights).__name__}")
    unknown = [repr(name) for name in weights if name not in names]
    if unknown:
        raise InputError(f"weights name no layer of the graph: {brief(unknown)}; its certified "
                         f"layers are {brief(map(repr, names), 8)}")
    new = {}
    for index, name in zip(network.affine_indices, names):
        if name not in weights:
            continue
        layer = network.layer(index)
        value = torch.as_tensor(weights[name]).detach()
        shapes = {tuple(layer.matrix.shape), tuple(layer.weight.shape)}
        if value.is_complex() or tuple(value.shape) not in shapes:
            kernel = f" (kernel {tuple(layer.weight.shape)})" if layer.is_conv else ""
            raise InputError(
                f"weights[{name!r}] is a {value.dtype} tensor of shape {tuple(value.shape)}; "
                f"layer {name!r} has a real weight matrix of shape {tuple(layer.matrix.shape)}"
                f"{kernel}")
        value = value.to("cpu", torch.float64).reshape(layer.weight.shape)
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise InputError(f"weights[{name!r}] has {bad} NaN or infinite entries of "
                             f"{value.numel()}; a model file needs finite weights")
        new[name] = value
    return new


def _read_onnx(path: Path) -> _File:
    """The initializers and ``Constant`` tensors of an ONNX file that torch can hold."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    external = [path.parent / name for name in onnx_external_files(path)]
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a readable ONNX file ({first_line(exc)}); "
                             "its external data file may be missing") from None
    protos = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        for attribute in node.attribute if node.op_type == "Constant" else ():
            if attribute.name == "value":
                protos[node.output[0]] = attribute.t
    tensors = {}
    for name, proto in protos.items():
        if proto.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT,
                               onnx.TensorProto.DOUBLE):
            tensors[name] = torch.from_numpy(np.array(numpy_helper.to_array(proto)))

    def save(replaced: dict[str, torch.Tensor], out: Path) -> list[Path]:
        for name, value in replaced.items():
            protos[name].CopyFrom(numpy_helper.from_array(value.numpy(), protos[name].name))
        if not external:
            onnx.save(model, str(out))
            return [out]
        data = out.with_name(out.name + ".data")
        if any(data.exists() and data.samefile(f) for f in external):
            raise ModelLoadError(f"{out.name} would write its external data over {data.name}, "
                                 f"which {path.name} reads: write the copy to another path")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name)
        return [out, data]

    return _File(tensors, save)


def _read_pt2(path: Path) -> _File:
    """The parameters, buffers and constants of a ``.pt2`` archive's program, vetted first."""
    program = load_pt2_program(path)
    stores = (program.state_dict, program.constants)
    tensors = {key: t.detach() for store in stores for key, t in store.items()
               if isinstance(t, torch.Tensor)}

    def save(replaced: dict[str, torch.Tensor], out: Path) -> list[Path]:
        for key, value in replaced.items():
            store = next(s for s in stores if key in s)
            old = store[key]
            store[key] = (torch.nn.Parameter(value, requires_grad=old.requires_grad)
                          if isinstance(old, torch.nn.Parameter) else value)
        torch.export.save(program, str(out))
        return [out]

    return _File(tensors, save)


def _read_state_dict(path: Path) -> _File:
    """A state dict's entries (``.safetensors`` keeps its metadata when saved again)."""
    tensors = _load_state_dict_file(path)

    def save(replaced: dict[str, torch.Tensor], out: Path) -> list[Path]:
        entries = {**tensors, **replaced}
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import save_file

            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata()
            save_file(entries, str(out), metadata=metadata)
        else:
            torch.save(entries, out)
        return [out]

    return _File(tensors, save)


def _sites(network: Graph, tensors: dict[str, torch.Tensor], origin: str,
           new: dict[str, torch.Tensor]) -> dict[str, _Site]:
    """Where each layer to change lives in the file: the one tensor and layout that fit it,
    read by no other layer."""
    readers: dict[str, set[str]] = {}
    found: dict[str, list[_Site]] = {}
    for index, name in zip(network.affine_indices, network.layer_names):
        layer = network.layer(index)
        found[name] = [site for key, tensor in tensors.items()
                       for site in _fits(layer, key, tensor)]
        for site in found[name]:
            readers.setdefault(site.key, set()).add(name)
    sites = {}
    for name in new:
        fits = found[name]
        if not fits:
            raise ModelLoadError(
                f"no tensor of {origin} holds the weight of layer {name!r}, as is, transposed, "
                "swapped (a transposed convolution) or scaled per output channel (a folded "
                "batch norm); certify writes weights stored as one tensor of the file")
        if len(fits) > 1:
            where = brief(f"{site.key!r} ({site.layout})" for site in fits)
            raise ModelLoadError(f"the weight of layer {name!r} fits several tensors or layouts "
                                 f"of {origin}: {where}; certify cannot tell which one to write")
        others = sorted(readers[fits[0].key] - {name})
        if others:
            raise ModelLoadError(
                f"layer {name!r} shares tensor {fits[0].key!r} of {origin} with "
                f"{brief(map(repr, others))}; certify writes only weights that one layer reads")
        sites[name] = fits[0]
    return sites


def _fits(layer: Affine, key: str, tensor: torch.Tensor):
    """The sites at which ``tensor`` holds ``layer``'s weight."""
    weight = layer.weight.detach().cpu()
    if not tensor.is_floating_point() or tensor.numel() != weight.numel():
        return
    shape, target, groups = tuple(tensor.shape), tuple(weight.shape), layer.groups
    layouts = [layout for layout, fits in (
        ("as is", shape == target),
        ("transposed", len(shape) == len(target) == 2 and shape == target[::-1]),
        ("swapped", layer.transposed and len(shape) == len(target) and shape[0] % groups == 0
         and (shape[1] * groups, shape[0] // groups, *shape[2:]) == target),
    ) if fits]
    for layout in layouts:
        view = _relayout(layout, tensor.to(torch.float64), groups)
        if torch.equal(view, weight):
            yield _Site(key, layout, None)
        # one channel first, where most tensors already differ; with one input per channel
        # every tensor would be a multiple
        elif weight.numel() > len(weight) and _factors(view[:1], weight[:1]) is not None:
            scale = _factors(view, weight)
            if scale is not None:
                yield _Site(key, layout, scale)


def _relayout(layout: str, x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` from the file's layout to the graph's, or back: each layout is an involution."""
    if layout == "transposed":
        return x.T
    return swap_kernel(x, groups) if layout == "swapped" else x


def _factors(view: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The factors ``f`` per output channel with ``weight[c] = f[c] view[c]`` up to float64
    rounding (NaN for a channel where both are zero), or ``None`` when there are none."""
    v, w = view.reshape(len(view), -1), weight.reshape(len(weight), -1)
    pivot = v.abs().argmax(dim=1, keepdim=True)
    at = v.gather(1, pivot)
    f = torch.where(at != 0, w.gather(1, pivot) / at, torch.nan)
    fitted = torch.where(f.isnan(), 0.0, v * f)
    if not bool(((w - fitted).abs() <= _FOLD_RTOL * w.abs()).all()):
        return None
    return f.squeeze(1)


def _file_value(name: str, layer: Affine, site: _Site, tensor: torch.Tensor,
                new: torch.Tensor) -> torch.Tensor:
    """The file tensor that gives ``layer`` the weight ``new``, in the file's layout and dtype."""
    value = new
    if site.scale is not None:
        f = site.scale.reshape(-1, *[1] * (new.ndim - 1))
        free = (f != 0) & ~f.isnan()
        stuck = (~free.flatten() & new.reshape(len(new), -1).any(dim=1)).nonzero().flatten()
        if len(stuck):
            raise ModelLoadError(
                f"layer {name!r}: output channels {brief(stuck.tolist())} are zero in the file or "
                "zeroed by the batch norm folded into the layer, so no value of the file gives "
                "them other weights: keep them zero")
        # channels that stay zero keep the file's values
        value = torch.where(free, new / f, _relayout(site.layout, tensor.double(), layer.groups))
    value = _relayout(site.layout, value, layer.groups).to(tensor.dtype).contiguous()
    if not bool(torch.isfinite(value).all()):
        raise ModelLoadError(
            f"layer {name!r}: the new weights (largest |entry| {float(new.abs().max()):.3g}) "
            f"overflow the file's {tensor.dtype} where it stores them")
    return value


def _check(network: Graph, graph: Graph, new: dict[str, torch.Tensor],
           sites: dict[str, _Site], tensors: dict[str, torch.Tensor], out: Path) -> None:
    """The copy's graph holds the new weights, and every other layer's weight and bias as
    before, bit for bit."""
    if graph.layer_names != network.layer_names:
        raise ModelLoadError(
            f"{out.name} reads back as another graph (layers {brief(graph.layer_names)}, "
            f"not {brief(network.layer_names)}); the copy is not kept: please report it")
    wrong = []
    for index, name in zip(network.affine_indices, network.layer_names):
        before, after = network.layer(index), graph.layer(index)
        got = after.weight.detach().cpu()
        if name not in new:
            fits = torch.equal(got, before.weight.detach().cpu())
        elif sites[name].scale is None:
            dtype = tensors[sites[name].key].dtype
            fits = torch.equal(got, new[name].to(dtype).to(torch.float64))
        else:  # divided by the factor, rounded to the dtype, times the factor
            info = torch.finfo(tensors[sites[name].key].dtype)
            f = sites[name].scale.nan_to_num(0.0).abs().reshape(-1, *[1] * (got.ndim - 1))
            bound = 4 * info.eps * new[name].abs() + info.tiny * f
            fits = bool(((got - new[name]).abs() <= bound).all())
        if not (fits and torch.equal(after.bias.detach().cpu(), before.bias.detach().cpu())):
            wrong.append(repr(name))
    if wrong:
        raise ModelLoadError(
            f"{out.name} does not read back as written: layers {brief(wrong)} hold other "
            "weights than asked for (or, unchanged, other weights or biases than before); the "
            "copy is not kept: please report it with the model")
