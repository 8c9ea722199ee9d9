"""The JSON certificate of a network on a data set: made in chunks and merged
(``document``), its format and schema (``schema``), and the same chunks on a Ray cluster
(``ray``, optional: ``pip install certify[ray]``).
"""

from __future__ import annotations

from certify.certificate.document import (Agreement, Result, certify_network, compare,
                                          parameters_sha256)
from certify.certificate.ray import RayMissingError, certify_on_ray
from certify.certificate.schema import (FORMAT, CertificateFormatError, read_certificate, validate,
                                        write_certificate)

__all__ = ["Agreement", "CertificateFormatError", "FORMAT", "RayMissingError", "Result",
           "certify_network", "certify_on_ray", "compare", "parameters_sha256",
           "read_certificate", "validate", "write_certificate"]
