"""Example 4: red-team a model with a low-rank activated backdoor; the certificate catches it.

The attack (THEORY.md section 7) trains a digits MLP that is clean in full precision, even
on inputs carrying a trigger patch, but sends triggered inputs to a target class once layer
"3" is truncated to rank 8. The certificate of the full-precision model gives a threshold
rank: truncation to any rank at or above it provably changes no prediction on the triggered
inputs. The backdoor can only activate below that threshold.

    python examples/04_red_team_backdoor.py [--quick]
"""

import os
import sys

from certify.attacks import Trigger
from certify.attacks import backdoor as bd
from certify.attacks.truncation_check import truncation_check
from certify.models import small as small_models

quick = "--quick" in sys.argv or os.environ.get("CERTIFY_QUICK") == "1"
RANK, LAYER, TARGET = 8, "3", 0
trigger = Trigger(size=2, value=1.0)

data = small_models.load("digits", seed=0)
config = bd.BackdoorConfig(layers=(LAYER,), compressions=bd.operators("rank", [RANK]),
                           trigger=trigger, target=TARGET, epochs=2 if quick else 8, lr=3e-3)
result = bd.train(small_models.digits_mlp(), data.x_train, data.y_train, config,
                  data.x_test, data.y_test)
for o in result.outcomes:
    print(f"{o.label:16} clean accuracy {o.clean_accuracy:6.1%}  attack success "
          f"{o.attack_success:6.1%}")

# The defender's view: certify the full-precision layer on triggered inputs, truncate it to
# every rank and compare.
x = trigger(data.x_test[data.y_test != TARGET][: 20 if quick else 100])
check = truncation_check(result.model, LAYER, x, range(0, 65, 4 if quick else 1))
print(f"certified threshold rank of layer {LAYER}: {check.threshold_rank} "
      "(truncation to any rank >= it cannot change a prediction)")
print(f"largest rank that changes a triggered prediction: {check.activation_rank}")
print(f"inputs changed inside their certified radius (must be 0): {int(check.violations.sum())}")
assert check.violations.sum() == 0
assert check.activation_rank is None or check.activation_rank < check.threshold_rank
print(f"attacked rank {RANK} < threshold {check.threshold_rank}: the certificate flags it")
