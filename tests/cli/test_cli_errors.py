"""The command line never crashes: bad arguments, paths and data are usage or input errors
(exit status 2, one line, before any long work), labels are used, an internal error is one
line with where to report it (exit status 3), and fuzzed argument lists and data files
never give anything else."""

from __future__ import annotations

import numpy as np
import pytest
from certified_models import certify
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import certify as package
from certify.cli.commands import EXIT_INTERNAL, main


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlp")
    return tmp, certify(tmp, "mlp", inputs=6)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("certify") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_version_and_exit_statuses_are_documented(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"certify {package.__version__}"
    for argv in (["--help"], ["check", "--help"], ["model", "--help"]):
        assert main(argv) == 0
        assert "exit status: 0 confirmed or done, 1 refuted, 2 usage" in \
            capsys.readouterr().out.replace("\n", " ")


@pytest.mark.parametrize("extra, message", [
    (["--out", "{tmp}/missing/c.json"], "does not exist; create it first"),
    (["--out", "{tmp}"], "is a folder"),
    (["--plot", "{tmp}/missing/r.png"], "does not exist"),
    (["--plot", "{tmp}/r.nope"], "unknown image format '.nope'"),
    (["--chunk", "0"], "--chunk must be a positive whole number"),
    (["--chunk", "-5"], "--chunk must be a positive whole number"),
    (["--limit", "-1"], "--limit must be a positive whole number"),
    (["--limit", "0"], "--limit must be a positive whole number"),
    (["--budgets", "1,2"], "budgets"),
])
def test_bad_options_fail_before_any_work(mlp, tmp_path, capsys, extra, message):
    _, args = mlp
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "c.json")]
    assert main(["model", *args, *out, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))  # nothing was certified


def test_plot_without_suffix_is_a_png_and_says_so(mlp, tmp_path, capsys):
    _, args = mlp
    assert main(["model", *args, "--out", str(tmp_path / "c.json"), "--limit", "2",
                 "--plot", str(tmp_path / "radii")]) == 0
    assert f"wrote {tmp_path / 'radii.png'}" in capsys.readouterr().out
    assert (tmp_path / "radii.png").stat().st_size > 0


def test_labels_give_accuracy_and_the_misclassified_inputs(mlp, capsys):
    tmp, args = mlp
    import json

    document = json.loads((tmp / "cert.json").read_text())
    y = np.load(tmp / "data.npz")["y"]
    wrong = [i for i, (p, t) in enumerate(zip(document["predictions"], y)) if p != t]
    assert document["labels"]["misclassified"] == wrong
    assert document["labels"]["accuracy"] == pytest.approx(1 - len(wrong) / len(y))
    assert main(["model", *args, "--out", str(tmp / "again.json")]) == 0
    printed = capsys.readouterr().out
    assert f"{len(wrong)} of {len(y)} misclassified" in printed
    assert "certificates are about the predicted class" in printed


@pytest.mark.parametrize("arrays_, message", [
    ({"x": np.zeros((6, 4, 4)), "y": np.zeros(5, dtype=int)}, "'y' has shape (5,)"),
    ({"x": np.zeros((6, 4, 4)), "y": np.full(6, 9)}, "outside 0..3"),
    ({"x": np.zeros((6, 4, 4)), "y": np.full(6, 0.5)}, "class indices"),
    ({"x": np.zeros((6, 4, 5))}, "do not fit the model"),
    ({"x": np.zeros(16)}, "batch axis"),
    ({"x": np.zeros((0, 4, 4))}, "no inputs"),
    ({"x": np.array([["a"] * 16])}, "inputs must be numbers"),
    ({"x": np.array([{}], dtype=object)}, "cannot read"),
    ({"inputs": np.zeros((6, 4, 4))}, "no array 'x'"),
])
def test_bad_data_is_an_input_error(mlp, tmp_path, capsys, arrays_, message):
    _, args = mlp
    np.savez(tmp_path / "bad.npz", **arrays_)
    data = args.index("--data") + 1
    argv = args[:data] + [str(tmp_path / "bad.npz")] + args[data + 1:]
    assert main(["model", *argv, "--out", str(tmp_path / "c.json")]) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize("name, content, message", [
    ("missing.npz", None, "no such file"),
    ("garbage.npz", b"\x00garbage", "cannot read"),
    ("inputs.txt", b"1 2 3", "expected a .npz archive"),
])
def test_unreadable_data_files_are_input_errors(mlp, tmp_path, capsys, name, content, message):
    _, args = mlp
    if content is not None:
        (tmp_path / name).write_bytes(content)
    data = args.index("--data") + 1
    argv = args[:data] + [str(tmp_path / name)] + args[data + 1:]
    assert main(["model", *argv, "--out", str(tmp_path / "c.json")]) == 2
    assert message in one_line_error(capsys)


def test_an_internal_error_is_one_line_and_debug_shows_the_traceback(mlp, tmp_path, capsys,
                                                                     monkeypatch):
    # The only way to reach the handler of bugs is a bug: one is planted in the certifier.
    import certify.certificate.document

    def broken(*args, **kwargs):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(certify.certificate.document, "certify_network", broken)
    _, args = mlp
    argv = ["model", *args, "--out", str(tmp_path / "c.json")]
    assert main(argv) == EXIT_INTERNAL
    err = one_line_error(capsys)
    assert "internal error (RuntimeError: planted bug)" in err and "report" in err
    assert main([*argv, "--debug"]) == EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


# -- fuzzing ------------------------------------------------------------------------------

# prove, demo and backdoor need no files, so a fuzzed list could start their long work;
# their options are tested where they are defined.
TOKENS = ["model", "check", "--data", "--out", "--limit", "--chunk", "--plot", "--compress",
          "--budgets", "--budget-norm", "--factory", "--bias", "--debug", "-1", "0", "2", "x",
          "rank=1", "bits=1", "prune=2", "fro", "nope.npz", "", "--version"]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.sampled_from(TOKENS), max_size=8))
def test_fuzzed_argument_lists_are_usage_errors(argv, capsys):
    # Without a real model and data file none of these can start work: each must be a
    # usage or input error (2; 0 where --version comes first), never a crash (3) or an
    # exception out of main.
    assert main(argv) in ({0, 2} if "--version" in argv else {2})
    assert "Traceback" not in capsys.readouterr().err


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=arrays(st.sampled_from([np.float64, np.float32, np.int8, np.bool_, np.complex64]),
                st.sampled_from([(2, 4, 4), (2, 16), (2, 4, 3), (4,), (0, 4, 4)]),
                elements={"allow_nan": True, "allow_infinity": True}),
       y=st.one_of(st.none(), arrays(np.int64, st.integers(0, 3),
                                     elements=st.integers(-1, 5))))
def test_fuzzed_data_files_certify_or_are_input_errors(mlp, tmp_path_factory, x, y, capsys):
    _, args = mlp
    tmp = tmp_path_factory.mktemp("fuzz")
    np.savez(tmp / "d.npz", x=x, **({} if y is None else {"y": y}))
    data = args.index("--data") + 1
    argv = args[:data] + [str(tmp / "d.npz")] + args[data + 1:]
    status = main(["model", *argv, "--out", str(tmp / "c.json"), "--limit", "2"])
    # The model flattens first, so (B, 4, 4) and (B, 16) both fit.
    valid = (x.dtype.kind in "fiu" and x.shape[1:] in ((4, 4), (16,)) and len(x) > 0
             and np.isfinite(x.astype(np.float64) if x.dtype.kind != "c" else 0).all()
             and (y is None or (len(y) == len(x) and ((y >= 0) & (y < 4)).all())))
    assert status == (0 if valid else 2)
    assert "Traceback" not in capsys.readouterr().err
