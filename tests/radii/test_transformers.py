"""Transformers end to end (THEORY.md section 8): tiny random vision and text transformers,
every layer certified in both norms, and weight-space attacks against the certificates.

The attacks are those of ``tests/radii/test_radius_soundness.py`` (from
``tests/support/weight_attacks.py``): projected gradient ascent and random vertices of the
weight ball at 0.999 x lower must never change a class, and the same ascent must change
classes at 1.1 x upper (the attack has teeth).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_transformers import Text, Vit, transformers
from weight_attacks import layer_weight, perturbed_classes, pgd_attack, random_ball

from certify.capture.export import capture
from certify.graph.operators import LayerNorm, Normalize, Product, Softmax
from certify.radii.radius import layer_radii


def problem(model_and_shape, seed: int):
    model, shape = model_and_shape
    torch.manual_seed(seed)
    x = torch.randn(3, *shape, dtype=torch.float64)
    net = capture(model, x)
    return net, x, net(x).argmax(-1)


CASES = (transformers(), st.sampled_from(["fro", "max"]), st.booleans(),
         st.integers(0, 2**31 - 1))


@settings(max_examples=6, deadline=None)
@given(*CASES)
def test_attacks_inside_lower_never_flip_and_the_witness_at_upper_does(model_and_shape, norm,
                                                                      bias, seed):
    """Both ends of every layer's bracket, from one ``layer_radii`` run per layer: attacks at
    0.999 x lower never change a class; the witness at ``upper`` does, and projected ascent
    at 1.1 x upper finds a change on most inputs (the attack can find what it looks for)."""
    net, x, y = problem(model_and_shape, seed)
    found = total = 0
    for index in net.affine_indices:
        r = layer_radii(net, x, index, norm, bias)
        assert torch.all((0 < r.lower) & (r.lower <= r.upper)), f"layer {r.layer}: {r.lower}"
        inside = 0.999 * r.lower
        W = layer_weight(net.layer(index), bias)
        for D in (pgd_attack(net, x, index, inside, norm, bias),
                  random_ball((len(x), *W.shape), inside, norm)):
            assert torch.equal(perturbed_classes(net, x, index, D, bias), y), (
                f"layer {r.layer}, {norm}: an attack inside 0.999 * lower changed a class")
        has = torch.isfinite(r.upper)
        assert torch.all((perturbed_classes(net, x, index, r.witness.matrix(), bias) != y)[has])
        D = pgd_attack(net, x, index, torch.where(has, 1.1 * r.upper, 0.0), norm, bias,
                       steps=60)
        found += int((perturbed_classes(net, x, index, D, bias) != y)[has].sum())
        total += int(has.sum())
    assert found >= total / 2, f"ascent at 1.1 x upper changed {found} of {total} classes"


def _vit():
    torch.manual_seed(0)
    return Vit(4, 2, 2, True, False, "none", "mean", 3).double()


def test_a_vit_becomes_the_operators_of_its_blocks():
    net = capture(_vit(), (1, 4, 4))
    kinds = [type(n.op) for n in net.nodes[1:]]
    assert kinds.count(LayerNorm) == 5 and kinds.count(Softmax) == 2
    assert kinds.count(Product) == 4  # q k^T and (attention) v in each block
    assert net.layer_names == ["patch"] + [f"blocks.{b}.{n}" for b in range(2) for n in
                                           ("q", "k", "v", "out", "fc1", "fc2")] + ["head"]


def test_methods_name_the_bounds_that_exist():
    """Upstream of the last attention the global bound does not exist (products of
    computed tensors): the linear bounds alone certify; after it both do."""
    net = capture(_vit(), (1, 4, 4))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    methods = {net.nodes[i].name:
               layer_radii(net, x, i, "fro", refine=False, enclose=False).method
               for i in net.affine_indices}
    assert methods["patch"] == methods["blocks.1.v"] == "crown(deviation)"
    assert methods["blocks.1.out"] == methods["blocks.1.fc2"] == "lipschitz+crown(deviation)"
    assert methods["head"] == "exact"


def test_a_text_encoder_on_embeddings_normalises_before_its_head():
    torch.manual_seed(0)
    net = capture(Text(4, 2, 1, False, True, "none", 2).double(), (3, 4))
    assert isinstance(net.nodes[net.input_of(net.output)].op, Normalize)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    r = layer_radii(net, x, net.affine_indices[-2], "max")
    assert torch.all(r.lower > 0) and math.isfinite(float(r.upper.max()))


def test_refinement_tightens_through_attention():
    """Backward refinement of the boxes through attention certifies radii at least as large
    as interval propagation alone, on every input, and larger on some."""
    net = capture(_vit(), (1, 4, 4))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    i = net.affine_indices[net.layer_names.index("blocks.0.fc2")]
    plain = layer_radii(net, x, i, "fro", refine=False, deviation=False).lower
    refined = layer_radii(net, x, i, "fro", refine=True, deviation=False).lower
    assert torch.all(refined >= plain * (1 - 1e-9))
    assert torch.any(refined > plain * 1.01)
