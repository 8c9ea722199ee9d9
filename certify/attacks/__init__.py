"""What a red team builds against the certificates (THEORY.md sections 6 and 7): the
compression-activated backdoor (``backdoor``), the compression operators it trains against
(``compressors``), closed-form implants (``implant``), preimage hiding (``preimage``), the
trigger (``trigger``) and a truncated layer confronted with its radii (``truncation_check``).
"""

from __future__ import annotations

from certify.attacks.backdoor import BackdoorConfig, BackdoorResult, train
from certify.attacks.implant import ConvexImplant, Implant, convex_implant
from certify.attacks.preimage import hide
from certify.attacks.trigger import Trigger, attack_success
from certify.attacks.truncation_check import TruncationCheck

__all__ = ["BackdoorConfig", "BackdoorResult", "ConvexImplant", "Implant", "Trigger",
           "TruncationCheck", "attack_success", "convex_implant", "hide", "train"]
