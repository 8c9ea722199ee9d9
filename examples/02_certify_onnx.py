"""Example 2: certify an ONNX model, then check the certificate independently.

1. Train a small MLP on scikit-learn's 8 x 8 digits (bundled, nothing is downloaded).
2. Export it to ONNX and save calibration inputs as ``.npz`` (an array ``x``).
3. ``certify model``: per layer and per input, the certified weight radius (no weight change
   of smaller norm alters the prediction), a verified witness and the safe compression levels.
4. ``certify check``: recompute every claim of the JSON certificate with numpy.

    python examples/02_certify_onnx.py [--quick] [--out DIR]

It writes the model, the calibration inputs and the certificate into ``DIR`` (created if
needed), by default a new temporary folder; the last line says where.
"""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from certify.cli import main
from certify.models import small as small_models

quick = "--quick" in sys.argv or os.environ.get("CERTIFY_QUICK") == "1"
out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else \
    Path(tempfile.mkdtemp(prefix="certify_example_02_"))
out.mkdir(parents=True, exist_ok=True)

# 1. A 64-64-64-10 ReLU MLP on digits, a few epochs of Adam.
data = small_models.load("digits", seed=0)
model = small_models.digits_mlp()
optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
for epoch in range(3 if quick else 20):
    for batch in torch.randperm(len(data.x_train)).split(64):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        loss.backward()
        optimiser.step()
model.eval()
accuracy = (model(data.x_test).argmax(-1) == data.y_test).float().mean()
print(f"test accuracy {accuracy:.1%}")

# 2. ONNX export (a dynamic batch axis) and the calibration inputs.
torch.onnx.export(model, (data.x_test[:1],), str(out / "digits.onnx"), dynamo=False,
                  input_names=["x"], dynamic_axes={"x": {0: "batch"}})
np.savez(out / "calibration.npz", x=data.x_test[: 16 if quick else 200].numpy())

# 3. and 4. The CLI, called from Python (the same as `certify model ...` in a shell).
model_args = [str(out / "digits.onnx"), "--data", str(out / "calibration.npz")]
main(["model", *model_args, "--out", str(out / "certificate.json")])
status = main(["check", str(out / "certificate.json"), *model_args])
print(f"the model, the inputs and the certificate are in {out}")
sys.exit(status)  # 0: every claim of the certificate confirmed
