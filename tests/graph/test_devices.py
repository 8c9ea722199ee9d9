"""The torch core is device-agnostic: every tensor it creates is on the device of the graph
and the inputs (``certify.graph.devices``; issue 14).

The meta trick runs on any machine: inside ``with torch.device("meta"):`` a tensor factory
called without ``device=`` makes a meta tensor, and combining it with a CPU tensor raises.
So the core, run on a CPU graph and CPU inputs inside that context, fails at every factory
that forgets ``device=`` (where CUDA would mix devices), and must give exactly the numbers
it gives outside the context. The CUDA test compares with the CPU where a GPU is present.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certify.attacks import backdoor as bd
from certify.cli import demo
from certify.graph import devices
from certify.models import small as small_models
from certify.capture.export import capture
from certify.closed_forms.compressions import Compression
from certify.radii.compressed import compression_check
from certify.closed_forms.thresholds import thresholds
from certify.attacks.implant import implant
from certify.graph.inputs import InputError
from certify.radii.multilayer import multilayer_bound, uniform_budget
from certify.graph.operators import Activation
from certify.closed_forms.perturbation import batch_target_change, class_pair_radius, margin_functional, \
    target_change
from certify.radii.radius import NORMS, layer_radii
from certify.testing import assert_compression_safe, assert_robust
from certify.attacks.trigger import Trigger
from certify.attacks.truncation_check import truncation_check

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


class ResidualNet(nn.Module):
    """Input normalisation, Conv-BN-ReLU, a residual block, max and average pooling, two
    branches concatenated and sliced, LeakyReLU, Tanh, and logits that are a sum (no dense
    logits layer): the forms an MLP, the MNIST CNN and a ViT leave out, on ``(1, 6, 6)``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5]).reshape(1, 1, 1))
        self.stem = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.LeakyReLU(0.1),
                                   nn.Conv2d(3, 3, 3, padding=1))
        self.a, self.b = nn.Linear(24, 6), nn.Linear(24, 6)
        self.head, self.skip = nn.Linear(10, 3), nn.Linear(24, 3)
        with torch.no_grad():
            self.stem[1].running_mean.uniform_(-0.2, 0.2)
            self.stem[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.stem((x - self.mean) / 0.3)
        h = F.relu(self.block(h) + h)
        h = torch.cat([F.max_pool2d(h, 3), F.avg_pool2d(h, 3)], 1).flatten(1)
        both = torch.cat([torch.tanh(self.a(h)), F.relu(self.b(h))], 1)
        return self.head(both[:, 2:]) + self.skip(h)


def _models():
    """(name, graph, inputs): small random models, each captured on the CPU."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 6), nn.Sigmoid(),
                        nn.Linear(6, 4))
    vit = small_models.ViT(side=8, patch=4, dim=8, depth=1, heads=2, hidden=16)
    out = []
    for name, module, shape in (("mlp", mlp, (8,)), ("mnist_cnn", small_models.build(
            "mnist", "cnn"), (1, 28, 28)), ("residual", ResidualNet(), (1, 6, 6)),
                                ("vit", vit, (1, 8, 8))):
        x = torch.rand(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out.append((name, capture(module.double().eval(), x), x))
    return out


MODELS = _models()


def _assert_same(meta, plain, what):
    """The run inside the meta context gave exactly the CPU numbers (the same CPU ops), on
    the CPU: tensors bit for bit, through dataclasses, dicts and sequences."""
    if isinstance(plain, torch.Tensor):
        assert meta.device == plain.device, f"{what} on {meta.device}"
        assert torch.equal(meta, plain), f"{what} differs"
    elif dataclasses.is_dataclass(plain):
        for f in dataclasses.fields(plain):
            _assert_same(getattr(meta, f.name), getattr(plain, f.name), f"{what}.{f.name}")
    elif isinstance(plain, dict):
        assert meta.keys() == plain.keys(), what
        for key in plain:
            _assert_same(meta[key], plain[key], f"{what}[{key!r}]")
    elif isinstance(plain, (tuple, list)):
        assert len(meta) == len(plain), what
        for k, (a, b) in enumerate(zip(meta, plain)):
            _assert_same(a, b, f"{what}[{k}]")
    else:
        assert meta == plain, what


def _core(network, x):
    """Every entry point of the core on one graph: radii of every affine layer in both
    norms, the multi-layer bound and budget, the compression thresholds and checks."""
    results = {}
    lower = {}
    for index in network.affine_indices:
        name = network.nodes[index].name
        for norm in NORMS:
            r = layer_radii(network, x, index, norm)
            results[f"layer_radii {name} {norm}"] = r
            lower.setdefault(name, {})[norm] = r.lower
            layer = network.layer(index)
            results[f"thresholds {name} {norm}"] = thresholds(
                layer.matrix, float(r.lower.min()), norm, dense=network.is_dense(index))
    budgets = [1e-3] * len(network.affine_indices)
    for norm in NORMS:
        results[f"multilayer_bound {norm}"] = multilayer_bound(network, x, budgets, norm)
        results[f"uniform_budget {norm}"] = uniform_budget(network, x, norm)
    first = network.layer_names[0]
    for kind, level in (("rank", 1), ("bits", 4), ("bits_per_channel", 4), ("prune", 0.5)):
        one = Compression(kind, level, (first,))
        results[f"compression_check {one}"] = compression_check(network, x, one, lower)
    results["compression_check all"] = compression_check(network, x, Compression("bits", 3))
    return results


@pytest.mark.parametrize("name,network,x", MODELS, ids=[m[0] for m in MODELS])
def test_core_creates_no_tensor_off_the_inputs_device(name, network, x):
    plain = _core(network, x)
    with torch.device("meta"):
        meta = _core(network, x)
    _assert_same(meta, plain, name)


def test_perturbation_kernels_create_no_tensor_off_the_inputs_device():
    g = torch.Generator().manual_seed(2)
    r, c, h = (torch.randn(3, k, dtype=torch.float64, generator=g) for k in (4, 4, 5))
    m = torch.rand(3, dtype=torch.float64, generator=g)
    h[0], m[0] = 0.0, 0.0  # the zero rows take their own branches
    logits = torch.randn(3, 4, dtype=torch.float64, generator=g)
    R, H = torch.randn(4, 3, dtype=torch.float64, generator=g), \
        torch.randn(5, 3, dtype=torch.float64, generator=g)

    def run():
        out = [class_pair_radius(logits, h, norm, bias=bias) for norm in ("fro", "max", "sum", 3)
               for bias in (False, True)]
        out += [margin_functional(c, h, m, norm) for norm in ("fro", "spectral", "max", "sum", 3)]
        out += [target_change(r[1:], h[1:], norm) for norm in ("fro", "max", "sum", 3)]
        return out + [batch_target_change(R, H, norm) for norm in ("fro", "spectral")]

    plain = run()
    with torch.device("meta"):
        meta = run()
    _assert_same(meta, plain, "perturbation")


SMALL = [m for m in MODELS if m[0] in ("mlp", "residual")]


@pytest.mark.parametrize("name,network,x", SMALL, ids=[m[0] for m in SMALL])
def test_testing_assertions_create_no_tensor_off_the_inputs_device(name, network, x):
    """``certify.testing``'s assertions at levels that are proved (full rank, 64 bits, no
    pruning, radius 0), one layer and all at once."""
    first = network.layer_names[0]

    def run():
        rank = max(max(network.layer(i).matrix.shape) for i in network.affine_indices)
        return (assert_robust(network, x, rank=rank, bits=64, prune=0.0, radius=0.0),
                assert_compression_safe(network, x, f"bits=64@{first}"),
                assert_compression_safe(network, x, rank=rank))

    plain = run()
    with torch.device("meta"):
        meta = run()
    _assert_same(meta, plain, name)


@dataclasses.dataclass(frozen=True)
class _Forgetful(Activation):
    """An activation whose interval rule makes a tensor without ``device=``: the regression
    the core test is there to catch."""

    def interval(self, box):
        lo, hi = super().interval(box)
        return lo + torch.zeros(lo.shape[-1], dtype=lo.dtype), hi


def test_the_meta_trick_has_teeth():
    """A factory without ``device=`` inside the context makes a meta tensor, which a CPU
    tensor refuses; one such factory in one operator's rule fails the core test's run,
    which passes without it."""
    cpu = torch.ones(3, dtype=torch.float64)
    with torch.device("meta"):
        forgot = torch.zeros(3, dtype=torch.float64)
        placed = torch.zeros(3, dtype=torch.float64, device=cpu.device)
        assert forgot.device.type == "meta"
        with pytest.raises(RuntimeError, match="is not on the expected device"):
            cpu + forgot
        assert torch.equal(cpu + placed, cpu)
    _, network, x = MODELS[0]
    relu = next(i for i, node in enumerate(network.nodes) if isinstance(node.op, Activation))
    broken = network.replace(relu, _Forgetful(network.nodes[relu].op.kind))
    _core(broken, x)  # the same numbers on the CPU: only the device is wrong
    with torch.device("meta"), pytest.raises(RuntimeError, match="is not on the expected device"):
        _core(broken, x)


def test_resolve_takes_the_cpu_in_every_spelling():
    for spelling in (None, "cpu", torch.device("cpu"), "cpu:0"):
        assert devices.resolve(spelling) == torch.device("cpu")
    assert devices.describe("cpu") == devices.describe(None) == "cpu"


@pytest.mark.parametrize("bad,match", [("gpu", "'gpu' is not a device name; use 'cpu'"),
                                       ("meta", "on the CPU or on CUDA, not on meta"),
                                       (0, "must be a string or a torch.device, got int")])
def test_resolve_explains_a_bad_device(bad, match):
    with pytest.raises(devices.DeviceError, match=match) as err:
        devices.resolve(bad)
    assert isinstance(err.value, InputError)  # the CLI reports it as an input error


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available on this machine")
def test_resolve_explains_a_missing_cuda():
    for spelling in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(devices.DeviceError, match=r"this torch has no CUDA device "
                           r"\(torch.cuda.is_available\(\) is False\); use 'cpu'.*install a "
                           "CUDA build of torch"):
            devices.resolve(spelling)


def test_inputs_on_another_device_than_the_network_are_refused():
    _, network, x = MODELS[0]
    with pytest.raises(InputError, match="x is on meta but the network on cpu; move one"):
        layer_radii(network, x.to("meta"), network.affine_indices[0], "fro")
    last = network.affine_indices[-1]
    op = network.layer(last)
    mixed = network.replace(last, op.with_weight(op.weight.to("meta"), op.bias.to("meta")))
    with pytest.raises(InputError, match="its weight is on meta but the first layer's weight "
                       "on cpu; move the whole graph with network.to"):
        layer_radii(mixed, x, last, "fro")
    # A numpy array has no device: it goes to the network's.
    r = layer_radii(network, x.numpy(), network.affine_indices[0], "fro")
    assert torch.equal(r.lower, layer_radii(network, x, network.affine_indices[0], "fro").lower)


@CUDA
def test_mnist_cnn_radii_on_cuda_match_the_cpu():
    """float64 on both: the same numbers up to the order of reductions (rtol 1e-9, the
    radii's own safety margin ``SAFETY``), the same predictions and methods; ``resolve``
    and ``describe`` name the device."""
    current = torch.cuda.current_device()
    assert devices.resolve("cuda") == torch.device("cuda", current)
    assert devices.describe("cuda") == f"cuda:{current} ({torch.cuda.get_device_name(current)})"
    with pytest.raises(devices.DeviceError, match="pick one of them"):
        devices.resolve(f"cuda:{torch.cuda.device_count()}")
    _, network, x = MODELS[1]
    on_gpu, x_gpu = network.to("cuda"), x.to("cuda")
    assert on_gpu.device.type == "cuda"
    for index in network.affine_indices:
        for norm in NORMS:
            cpu = layer_radii(network, x, index, norm)
            gpu = layer_radii(on_gpu, x_gpu, index, norm)
            assert gpu.lower.device.type == "cuda" and gpu.method == cpu.method
            for field in ("lower", "upper", "estimate"):
                torch.testing.assert_close(getattr(gpu, field).cpu(), getattr(cpu, field),
                                           rtol=1e-9, atol=0)
    assert torch.equal(on_gpu(x_gpu).argmax(-1).cpu(), network(x).argmax(-1))


TINY = Trigger(size=2)


@pytest.fixture(scope="module")
def digits():
    split = small_models.load("digits", seed=0)
    return split.x_train[:128], split.y_train[:128]


def test_backdoor_training_takes_a_device_and_returns_on_the_cpu(digits):
    x, y = digits
    config = bd.BackdoorConfig(("3",), bd.operators("rank", [4]), TINY, epochs=1)
    default = bd.train(small_models.digits_mlp(), x, y, config)
    on_cpu = bd.train(small_models.digits_mlp(), x, y, config, device="cpu")
    assert on_cpu.outcomes == default.outcomes
    assert all(p.device.type == "cpu" for p in on_cpu.model.parameters())
    assert bd.measure(on_cpu.model, x, y, config, device="cpu") == on_cpu.outcomes
    check = truncation_check(on_cpu.model, "3", TINY(x[:4]).double(), (0, 8), device="cpu")
    assert torch.equal(check.lower,
                       truncation_check(on_cpu.model, "3", TINY(x[:4]).double(), (0, 8)).lower)
    with pytest.raises(devices.DeviceError, match="'gpu' is not a device name"):
        bd.train(small_models.digits_mlp(), x, y, config, device="gpu")


@pytest.mark.parametrize("variant,level", [("rank", 4), ("bits", 4), ("prune", 0.5)])
def test_backdoor_training_creates_no_tensor_off_the_models_device(digits, variant, level):
    """The section-7 loss through every compression's training view, Adam and the
    measurements, inside the meta context: the same weights and outcomes bit for bit. The
    model is built outside (its parameters would be meta tensors). Autograd's engine runs
    backward passes outside the context: the truncation's own (``_Truncate.backward``) is
    checked by the CUDA test below."""
    x, y = digits
    config = bd.BackdoorConfig(("3",), bd.operators(variant, [level]), TINY, epochs=1)
    model = small_models.digits_mlp()
    plain = bd.train(model, x, y, config, device="cpu")
    with torch.device("meta"):
        meta = bd.train(model, x, y, config, device="cpu")
    _assert_same(meta.outcomes, plain.outcomes, variant)
    _assert_same(meta.model.state_dict(), plain.model.state_dict(), variant)


def test_implant_puts_arrays_on_the_weights_device():
    g = torch.Generator().manual_seed(3)
    W, H, Z = (torch.randn(*shape, dtype=torch.float64, generator=g)
               for shape in ((6, 5), (5, 3), (6, 3)))
    plain = implant(W, H.numpy(), Z.numpy(), 2)
    with torch.device("meta"):
        meta = implant(W, H.numpy(), Z.numpy(), 2)
    _assert_same(meta, plain, "implant")


@CUDA
def test_backdoor_on_cuda_measures_and_certifies_like_the_cpu(digits):
    """Training on CUDA returns a CPU model; measuring it (float32) agrees with the CPU up
    to near-ties, its float64 radii up to rtol 1e-9."""
    x, y = digits
    config = bd.BackdoorConfig(("3",), bd.operators("rank", [4]), TINY, epochs=1)
    trained = bd.train(small_models.digits_mlp(), x, y, config, device="cuda")
    assert all(p.device.type == "cpu" for p in trained.model.parameters())
    cpu, gpu = (bd.measure(trained.model, x, y, config, device=d) for d in ("cpu", "cuda"))
    for a, b in zip(cpu, gpu):
        assert a.clean_accuracy == pytest.approx(b.clean_accuracy, abs=2.01 / len(x))
    inputs = TINY(x[:4]).double()
    on_cpu, on_gpu = (truncation_check(trained.model, "3", inputs, (0, 8), device=d)
                      for d in ("cpu", "cuda"))
    assert on_gpu.lower.device.type == "cpu"
    torch.testing.assert_close(on_gpu.lower, on_cpu.lower, rtol=1e-9, atol=0)
    assert torch.equal(on_gpu.flipped, on_cpu.flipped)


def test_demo_runs_on_the_device_it_is_given(tmp_path):
    """The smallest demo (64 training images, 2 certified inputs) on ``device="cpu"``: the
    summary and both certificates say where they were computed; a bad device is refused
    before anything is written."""
    config = demo.DemoConfig(attacked=(8,), sweep=(0, 8), epochs=1, train_images=64,
                             certified_inputs=2)
    summary = demo.run(config, tmp_path / "out", log=lambda line: None, device="cpu")
    assert summary["device"] == "cpu"
    for model in ("clean", "backdoored"):
        certificate = json.loads((tmp_path / "out" / model / "certificate.json").read_text())
        assert certificate["device"] == "cpu"
    with pytest.raises(devices.DeviceError, match="not on meta"):
        demo.run(config, tmp_path / "refused", device="meta")
    assert not (tmp_path / "refused").exists()


# -- the command line: --device is checked before any work and recorded -------------------

def test_certify_model_records_the_device_and_check_confirms_it(tmp_path, capsys):
    import numpy as np

    import matrix_models
    from certify.cli import main

    torch.save(matrix_models.view_mlp().state_dict(), tmp_path / "model.pt")
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).random((5, 1, 8, 8)))
    model = [str(tmp_path / "model.pt"), "--factory", "matrix_models:view_mlp",
             "--data", str(tmp_path / "data.npz")]
    out = tmp_path / "cert.json"
    assert main(["model", *model, "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["device"] == "cpu"
    assert main(["check", str(out), *model, "--device", "cpu"]) == 0
    assert "computed on cpu" in capsys.readouterr().out


@pytest.mark.parametrize("command", [
    ["model", "m.pt", "--data", "d.npz", "--out", "{tmp}/c.json"],
    ["check", "c.json", "m.pt", "--data", "d.npz"],
    ["backdoor", "--out", "{tmp}/b", "--ranks", "8"],
    ["demo", "--out", "{tmp}/demo"]])
@pytest.mark.parametrize("device,says", [("gpu", "not a device name"),
                                         ("cuda:99", "cuda")])
def test_a_device_this_machine_lacks_is_refused_before_any_work(command, device, says,
                                                                 tmp_path, capsys):
    """Exit status 2 and one line, before the (missing) model or data files are read."""
    from certify.cli import main

    if device.startswith("cuda") and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a cuda:99")
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main([*args, "--device", device]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and not (tmp_path / "demo").exists()
