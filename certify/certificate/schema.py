"""The certificate's format: its JSON Schema, and the rules the schema cannot state.

``certificate.schema.json`` (shipped in the package, JSON Schema draft 2020-12) fixes every
field's type and range; ``validate`` adds what depends on the number of inputs (every
per-input list has one entry per prediction) and refuses non-finite numbers (JSON has
none; Python would read ``NaN`` and ``Infinity``). A document that passes is well formed;
whether its claims are true is ``certify.check.claims``'s question.

Both directions use it: ``write_certificate`` validates before writing, and
``read_certificate`` before anything is recomputed, so a malformed or truncated file, or
one of an unknown format version, is refused with a message naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

FORMAT = "certify/weight-radii/1"
SCHEMA_FILE = "certificate.schema.json"
NORMS = ("fro", "max")


def array_sha256(x: np.ndarray) -> str:
    """Hash of an array's float64 values and shape."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    digest = hashlib.sha256(str(x.shape).encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


class CertificateFormatError(ValueError):
    """The certificate is not a well-formed ``certify/weight-radii/1`` document."""


@cache
def schema() -> dict:
    """The JSON Schema of the certificate (``certify/certificate.schema.json``)."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text())


def _where(path) -> str:
    return "/".join(str(p) for p in path) or "the document"


def _finite(value, path=()) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CertificateFormatError(f"{_where(path)}: {value} is not a JSON number; radii "
                                     "without a value are written as null")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite(item, (*path, i))


def _lengths(document: dict) -> None:
    """Every per-input list has one entry per input (``len(predictions)``)."""
    n = len(document["predictions"])
    lists = [(("multilayer", norm, "uniform_budget"), document["multilayer"][norm]["uniform_budget"])
             for norm in NORMS]
    for i, layer in enumerate(document["layers"]):
        for norm in NORMS:
            lists += [(("layers", i, norm, key), layer[norm][key])
                      for key in ("lower", "upper", "estimate")]
    for i, entry in enumerate(document.get("compression_checks", [])):
        if entry["harmless"] is not None:
            lists.append((("compression_checks", i, "harmless"), entry["harmless"]))
        lists += [(("compression_checks", i, "harmless_per_layer", name), values)
                  for name, values in entry["harmless_per_layer"].items()]
        lists += [(("compression_checks", i, key), entry[key]) for key in ("jointly", "strength")
                  if entry.get(key) is not None]
        for k in entry["changed"]:
            if k >= n:
                raise CertificateFormatError(f"compression_checks/{i}/changed: input {k} does "
                                             f"not exist (the certificate has {n} inputs)")
    whole = document.get("whole_model")
    if whole is not None:
        lists += [(("whole_model", kind), whole[kind]) for kind in whole if kind != "threshold"]
    for path, values in lists:
        if len(values) != n:
            raise CertificateFormatError(
                f"{_where(path)} has {len(values)} entries but the certificate has {n} inputs "
                "(one prediction each): the file is truncated or was edited")
    names = [layer["name"] for layer in document["layers"]]
    if len(set(names)) != len(names):
        raise CertificateFormatError(f"layers: names repeat ({names})")
    labels = document.get("labels")
    if labels is not None and any(k >= n for k in labels["misclassified"]):
        raise CertificateFormatError(f"labels/misclassified names an input beyond the {n} "
                                     "certified")


def validate(document) -> None:
    """Raise ``CertificateFormatError`` unless ``document`` is a well-formed certificate."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not isinstance(document, dict):
        raise CertificateFormatError(f"a certificate is a JSON object, got a "
                                     f"{type(document).__name__}")
    if document.get("format") != FORMAT:
        raise CertificateFormatError(
            f"format is {document.get('format')!r}, not {FORMAT!r}: this is not a certificate "
            f"of this certify version (or not a certify certificate); re-create it with "
            f"certify model")
    _finite(document)
    error = best_match(Draft202012Validator(schema()).iter_errors(document))
    if error is not None:
        raise CertificateFormatError(f"{_where(error.absolute_path)}: {error.message} (see "
                                     f"{SCHEMA_FILE} in certify.certificate)")
    _lengths(document)


def _no_constants(token: str):
    raise CertificateFormatError(f"{token} is not a JSON number; radii without a value are "
                                 "written as null")


def read_json(path: str | Path):
    """The JSON document in the file ``path`` (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise CertificateFormatError(f"{path}: no such certificate file"
                                     + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CertificateFormatError(f"{path} is not a JSON certificate ({err}); pass the "
                                     ".json file that certify model wrote") from None
    except CertificateFormatError as err:
        raise CertificateFormatError(f"{path}: {err}") from None


def read_certificate(path: str | Path) -> dict:
    """The validated certificate in the file ``path``."""
    document = read_json(path)
    try:
        validate(document)
    except CertificateFormatError as err:
        raise CertificateFormatError(f"{path}: {err}") from None
    return document


def witness_path(path: str | Path) -> Path:
    """The witnesses archive beside a certificate: ``cert.json`` -> ``cert.witnesses.npz``."""
    path = Path(path)
    return path.with_name(path.stem + ".witnesses.npz")


def write_certificate(document: dict, path: str | Path) -> None:
    """Validate ``document`` and write it as JSON to ``path``."""
    validate(document)
    Path(path).write_text(json.dumps(document, indent=1, allow_nan=False))
