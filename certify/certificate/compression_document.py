"""The compression certificate's format (``certify/compression/1``): what ``certify
compress`` writes beside the compressed model, its JSON Schema (``compression.schema.json``)
and the rules the schema cannot state (every per-input list has one entry per prediction;
the indices lie among the inputs). ``certify.check.compressed_model`` confirms its claims.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

from certify.certificate.schema import CertificateFormatError, _finite, _where

FORMAT = "certify/compression/1"
SCHEMA_FILE = "compression.schema.json"


@cache
def schema() -> dict:
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text())


def validate(document) -> None:
    """Raise ``CertificateFormatError`` unless ``document`` is a well-formed compression
    certificate."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CertificateFormatError(f"not a {FORMAT!r} document; re-create it with certify "
                                     "compress")
    _finite(document)
    error = best_match(Draft202012Validator(schema()).iter_errors(document))
    if error is not None:
        raise CertificateFormatError(f"{_where(error.absolute_path)}: {error.message} (see "
                                     f"{SCHEMA_FILE} in certify.certificate)")
    n = len(document["predictions"])
    for key in ("compressed_predictions", "harmless", "strength"):
        if document[key] is not None and len(document[key]) != n:
            raise CertificateFormatError(f"{key}: {len(document[key])} entries for {n} inputs")
    for key in ("changed", "not_vouched"):
        if any(i >= n for i in document[key]):
            raise CertificateFormatError(f"{key}: an index beyond the {n} inputs")


def write(document: dict, path: str | Path) -> None:
    """Validate ``document`` and write it as JSON to ``path``."""
    validate(document)
    Path(path).write_text(json.dumps(document, indent=1, allow_nan=False))
