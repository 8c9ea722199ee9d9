"""Vet a ``torch.export.save`` archive (``.pt2``) and load it without running code from it.

``torch.export.load`` unpickles with ``weights_only=False`` in several places (weights and
constants flagged ``use_pickle``, opaque objects, a fallback for the sample inputs), evaluates
shape expressions with ``sympy.sympify`` (``eval``), ``exec``-s the archive's guard code in
``ExportedProgram.module()`` and pastes names from the graph into generated source. The archive
is therefore read here first and refused unless every one of those inputs is inert: no pickled
payloads, no AOTInductor binaries, shape expressions from a small sympy grammar, node targets
``torch.ops.aten`` / ``torch.ops.prims`` operators (and a few ``operator`` / ``math`` /
``torch.sym_*`` functions), every name a plain identifier path. The module is built with
``module(check_guards=False)`` so the archive's guard code is never compiled.

The result is a ``torch.fx.GraphModule`` whose graph calls ``torch.ops.aten`` operators; it can
be exported again with ``torch.export.export``. A graph traced in training mode is refused.
``load_pt2_program`` stops before the module: the vetted ``ExportedProgram``, whose weights
``certify.formats.writing`` changes and saves again.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from certify.formats.errors import ModelLoadError, first_line
from certify.graph.inputs import brief

# Strings in the archive's JSON that never reach eval/exec/generated source (metadata kept in
# node.meta, constant string arguments that torch.fx writes with repr(), the torch version,
# and guard code, which module(check_guards=False) never compiles).
_PT2_FREE_TEXT_KEYS = frozenset({
    "stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node",
    "as_string", "as_strings", "torch_version", "guards_code",
})
# JSON documents stored as strings (pytree specs and their contexts): parsed and vetted.
_PT2_NESTED_JSON_KEYS = frozenset({"in_spec", "out_spec", "context"})
_PT2_SAFE_STR = re.compile(r"[A-Za-z0-9_.+\-]*\Z")
_PT2_KEY = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_PT2_FQN = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")
_PT2_OP_TARGET = re.compile(
    r"torch\.ops\.(?:aten|prims)\.(?!__)[A-Za-z0-9_]+\.(?!__)[A-Za-z0-9_]+\Z"
)
_PT2_DENIED_OPS = frozenset({"from_file"})
_PT2_PY_TARGETS = frozenset(
    [f"_operator.{n}" for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "neg", "mod", "pow",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "pos", "abs",
    )]
    + [f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")]
    + [f"torch.{n}" for n in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite", "sym_sum",
    )]
)
_SYMPY_NAMES = frozenset({
    # sympy classes that srepr writes
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs",
    "floor", "ceiling", "Equality", "Unequality", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "true", "false", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "NaN", "One", "Zero",
    "NegativeOne", "Half", "BooleanTrue", "BooleanFalse", "True", "False", "None",
    # torch.utils._sympy.functions, as torch's deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
    # keyword arguments: assumptions and Float's precision
    "precision", "algebraic", "antihermitian", "commutative", "complex", "composite", "even",
    "extended_negative", "extended_nonnegative", "extended_nonpositive", "extended_nonzero",
    "extended_positive", "extended_real", "finite", "hermitian", "imaginary", "infinite",
    "integer", "irrational", "negative", "noninteger", "nonnegative", "nonpositive", "nonzero",
    "odd", "polar", "positive", "prime", "rational", "real", "transcendental", "zero",
})
_SYMPY_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+\Z")
_SYMPY_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<number>[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
    r"|(?P<string>'[A-Za-z0-9_.+\-]*')"
    r"|(?P<op>\*\*|==|!=|<=|>=|[-+*/%(),=<>]))"
)


class _Pt2Refused(Exception):
    pass


def load_pt2_file(path: Path) -> torch.fx.GraphModule:
    """The program named ``model`` in the archive at ``path``, vetted first, as a module built
    with ``check_guards=False``; ``ModelLoadError`` if it is refused or unreadable."""
    program = load_pt2_program(path)
    try:
        module = program.module(check_guards=False)
    except Exception as exc:
        raise _unloadable(path, exc) from None
    _check_exported_eval_mode(module, path)
    return module


def load_pt2_program(path: Path) -> torch.export.ExportedProgram:
    """The exported program named ``model`` in the archive at ``path``, deserialised only after
    the archive is vetted; ``ModelLoadError`` if it is refused or unreadable."""
    data = path.read_bytes()  # read once: the bytes vetted are the bytes loaded
    try:
        from torch.export.pt2_archive._package import PT2ArchiveReader, load_pt2

        with PT2ArchiveReader(io.BytesIO(data)) as reader:
            _vet_pt2_archive(reader)
    except _Pt2Refused as exc:
        raise ModelLoadError(
            f"{path.name} was refused: {exc}. certify never runs code from a model file; "
            "export plain models with torch.export.save(torch.export.export(model.eval(), "
            "(x,)), path) on CPU"
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} is not a readable torch.export archive ({type(exc).__name__}: "
            f"{first_line(exc)}); it may be truncated or corrupt, or not made by "
            "torch.export.save: export it again with torch.export.save"
        ) from None

    try:
        programs = load_pt2(io.BytesIO(data)).exported_programs
        if "model" not in programs:
            raise RuntimeError(f"no program named 'model' (found {sorted(programs)})")
    except Exception as exc:
        raise _unloadable(path, exc) from None
    return programs["model"]


def _unloadable(path: Path, exc: Exception) -> ModelLoadError:
    """The error for a vetted archive that torch.export fails to deserialise."""
    return ModelLoadError(
        f"torch.export cannot load {path.name} ({type(exc).__name__}: {first_line(exc)}); "
        f"export it again with torch.export.save under torch {torch.__version__}"
    )


def _check_exported_eval_mode(module: torch.fx.GraphModule, path: Path) -> None:
    """An exported graph keeps the train/eval mode it was traced in; certify needs eval."""
    in_training = []
    for node in module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for index, argument in enumerate(node.target._schema.arguments):
            if argument.name not in ("training", "train"):
                continue
            value = node.args[index] if index < len(node.args) else node.kwargs.get(
                argument.name, argument.default_value if argument.has_default_value() else None
            )
            if value is True:
                in_training.append(f"{node.name} ({node.target})")
    if in_training:
        raise ModelLoadError(
            f"{path.name} was exported in training mode (batch norm would use batch "
            f"statistics, dropout would be active), in: {brief(in_training, 3)}; call "
            "model.eval() before torch.export.export and save it again"
        )


def _vet_pt2_archive(reader) -> None:
    from torch.export.pt2_archive import constants as C

    names = reader.get_file_names()
    if len(set(names)) != len(names):
        raise _Pt2Refused("the archive has duplicate entries")
    if reader.read_string(C.ARCHIVE_VERSION_PATH) != C.ARCHIVE_VERSION_VALUE:
        raise _Pt2Refused("unknown archive version")
    for name in names:
        if name.startswith(C.AOTINDUCTOR_DIR) or name.startswith(C.EXECUTORCH_DIR):
            raise _Pt2Refused(
                f"it contains compiled code ({name}); AOTInductor / ExecuTorch packages are "
                "not accepted"
            )
    models = [
        n[len(C.MODELS_DIR):-len(".json")] for n in names
        if n.startswith(C.MODELS_DIR) and n.endswith(".json")
    ]
    if "model" not in models:
        raise _Pt2Refused("it holds no exported program named 'model'")
    for model in models:
        if not _PT2_FQN.match(model):
            raise _Pt2Refused(f"unexpected program name {model!r}")
        for legacy in (f"{C.WEIGHTS_DIR}{model}.pt", f"{C.CONSTANTS_DIR}{model}.pt"):
            if legacy in names:
                raise _Pt2Refused(f"it uses the legacy pickled layout ({legacy})")
        for config_name, is_constants in (
            (C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), False),
            (C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), True),
        ):
            if config_name not in names:
                raise _Pt2Refused(f"{config_name} is missing")
            config = json.loads(reader.read_string(config_name))
            entries = config.get("config") if isinstance(config, dict) else None
            if not isinstance(entries, dict):
                raise _Pt2Refused(f"{config_name} is malformed")
            for fqn, meta in entries.items():
                if not _PT2_FQN.match(fqn) or not isinstance(meta, dict):
                    raise _Pt2Refused(f"unexpected entry {fqn!r} in {config_name}")
                if meta.get("use_pickle"):
                    raise _Pt2Refused(f"{fqn!r} is stored as a pickle")
                path_name = meta.get("path_name", "")
                if not isinstance(path_name, str) or not _PT2_SAFE_STR.match(path_name):
                    raise _Pt2Refused(f"unexpected payload name for {fqn!r}")
                if is_constants and not path_name.startswith(C.TENSOR_CONSTANT_FILENAME_PREFIX):
                    raise _Pt2Refused(
                        f"constant {fqn!r} is a Python or TorchScript object, not a tensor"
                    )
        sample = C.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if sample in names:
            payload = reader.read_bytes(sample)
            if payload:
                # torch retries with weights_only=False when this fails; make sure it cannot.
                try:
                    torch.load(io.BytesIO(payload), weights_only=True)
                except Exception:
                    raise _Pt2Refused(
                        "its sample inputs hold objects other than tensors (or were saved on "
                        "a device this machine lacks)"
                    ) from None
        document = json.loads(reader.read_string(C.MODELS_FILENAME_FORMAT.format(model)))
        _vet_pt2_json(document, key=None, where=f"models/{model}.json")


def _vet_pt2_json(value: Any, key: str | None, where: str) -> None:
    if isinstance(value, dict):
        if "as_custom_obj" in value:
            raise _Pt2Refused("it uses custom (TorchScript or opaque) objects")
        is_node = "target" in value and "inputs" in value
        for child_key, child in value.items():
            if not isinstance(child_key, str) or not _PT2_KEY.match(child_key):
                raise _Pt2Refused(f"unexpected key {str(child_key)[:60]!r} in {where}")
            if child_key == "target" and is_node:
                _vet_pt2_target(child)
            elif child_key == "as_operator":
                _vet_pt2_target(child)
            _vet_pt2_json(child, child_key, where)
    elif isinstance(value, list):
        for item in value:
            _vet_pt2_json(item, key, where)
    elif isinstance(value, str):
        if key in _PT2_FREE_TEXT_KEYS:
            return
        if key == "expr_str":
            _vet_sympy_expression(value)
        elif key in _PT2_NESTED_JSON_KEYS and not _PT2_SAFE_STR.match(value):
            try:
                nested = json.loads(value)
            except ValueError:
                raise _Pt2Refused(f"malformed {key} in {where}") from None
            _vet_pt2_json(nested, key, where)
        elif not _PT2_SAFE_STR.match(value):
            raise _Pt2Refused(f"unexpected {key or 'value'} {value[:60]!r} in {where}")
    elif value is None or isinstance(value, (bool, int, float)):
        return
    else:  # pragma: no cover - json only produces the types above
        raise _Pt2Refused(f"unexpected value in {where}")


def _vet_pt2_target(target: Any) -> None:
    if not isinstance(target, str):
        raise _Pt2Refused("a node target is not a string")
    if _PT2_OP_TARGET.match(target):
        if target.split(".")[3] in _PT2_DENIED_OPS:
            raise _Pt2Refused(f"it calls {target}")
        return
    if target in _PT2_PY_TARGETS:
        return
    raise _Pt2Refused(
        f"it calls {target[:80]!r}; only torch.ops.aten / torch.ops.prims operators (and basic "
        "operator / math / torch.sym_* functions) are accepted"
    )


def _vet_sympy_expression(text: str) -> None:
    if len(text) > 10_000:
        raise _Pt2Refused("a shape expression is too long")
    position = 0
    while position < len(text):
        match = _SYMPY_TOKEN.match(text, position)
        if match is None or match.end() == position:
            if text[position:].strip() == "":
                return
            raise _Pt2Refused(f"unexpected shape expression {text[:60]!r}")
        name = match.group("name")
        if name is not None and name not in _SYMPY_NAMES and not _SYMPY_SYMBOL_NAME.match(name):
            raise _Pt2Refused(f"unexpected name {name[:40]!r} in shape expression")
        position = match.end()

