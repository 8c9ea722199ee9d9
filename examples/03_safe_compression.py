"""Example 3: find compression levels that provably change no prediction, then confirm.

For each layer of a small digits MLP, the certificate gives the smallest rank, bit width
and the largest pruning ratio that are safe on the calibration inputs (THEORY.md section 6:
the compression error is below every input's certified radius). ``assert_robust`` states
such a level as a test; ``assert_compression_safe`` also runs the compressed model; a level
beyond the safe one is confronted with the concrete compressed model.

    python examples/03_safe_compression.py [--quick]
"""

import os
import sys

import torch

from certify import Compression, certify_network, compression_check
from certify.capture import capture
from certify.certificate import parameters_sha256
from certify.models import small as small_models
from certify.testing import assert_compression_safe, assert_robust

quick = "--quick" in sys.argv or os.environ.get("CERTIFY_QUICK") == "1"
torch.manual_seed(0)

data = small_models.load("digits", seed=0)
model = small_models.digits_mlp()
optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
for epoch in range(3 if quick else 20):
    for batch in torch.randperm(len(data.x_train)).split(64):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train[batch]),
                                          data.y_train[batch]).backward()
        optimiser.step()
model.eval()
x = data.x_test[: 16 if quick else 200].double()

# The certificate: radii of every layer, and the thresholds they imply.
network = capture(model, x)
document = certify_network(network, x, model_sha256=parameters_sha256(model),
                           progress=False).document
print(f"{'layer':6} {'shape':8} {'safe rank >=':>12} {'safe bits >=':>12} {'safe prune <=':>13}")
for layer in document["layers"]:
    fro, max_ = layer["fro"]["threshold"], layer["max"]["threshold"]
    rank = min(fro["rank"], max_["rank"])
    bits = min(b for b in (fro["bits"], max_["bits"], 64) if b is not None)
    prune = max(fro["prune_ratio"], max_["prune_ratio"])
    print(f"{layer['name']:6} {'x'.join(map(str, layer['shape'])):8} {rank:12d} {bits:12d} "
          f"{prune:13.1%}")
    # The same claims as a test: raises AssertionError (with the failing input) if unproved.
    assert_robust(model, x, layers=[layer["name"]], rank=rank, bits=bits, prune=prune)
    assert_compression_safe(model, x, Compression("bits", bits, (layer["name"],)))

    # Beyond the safe level: what does the concrete compressed model do?
    if rank > 0:
        below = Compression("rank", rank - 1, (layer["name"],))
        result = compression_check(network, x, below)
        print(f"       {below}: {int(result.changed.sum())} of {len(x)} predictions change "
              "(not certified: the certificate makes no promise here)")
print("every level above was proved safe on the calibration inputs")
