"""Benchmark certify's closed forms against cvxpy on the same convex programs.

For square layers ``m = n = size`` and random float64 instances (fixed seed), three
problems of THEORY.md sections 1 to 3 are solved side by side in one process:

=======================  =====================================  =========================
problem                  convex program                         certify call
=======================  =====================================  =========================
``target_change``        ``min ||D||  s.t.  D h = r``           ``target_change(r, h)``
``margin_functional``    ``min ||D||  s.t.  c^T D h = -m``      ``margin_functional(...)``
``batch_target_change``  ``min ||D||  s.t.  D H = R``           ``batch_target_change``
=======================  =====================================  =========================

The torch side is ONE batched call over all instances of a size (the whole API call:
validation, value and minimiser; median wall time of several repeats, divided by the
number of instances), on one thread by default like the solver. The cvxpy side solves one
instance at a time with Clarabel; its time is the wall time of ``prob.solve()``,
compilation included. Each table row reports both times, their ratio and the largest
relative error ``|ours - cvxpy| / max(|cvxpy|, tiny)`` of the optimal values.

cvxpy cannot do every cell in reasonable time: ``sigma_max`` becomes a semidefinite
program with a ``2n x 2n`` PSD cone (about a minute per instance at n = 64 already), the
entrywise max and sum norms become linear programs with ``2 m n`` inequalities (30 s to
90 s per instance at n = 1024), and ``D H = R`` has ``m n N`` nonzeros in its constraint
matrix. Such cells are reported as skipped (the limits are options); every other cell
solves instances until its time budget is spent (at least one instance).

Usage::

    python benchmarks/closed_forms_vs_cvxpy.py            # default run, under ~10 minutes
    python benchmarks/closed_forms_vs_cvxpy.py --quick    # smoke test, a few seconds

Writes ``closed_forms_vs_cvxpy.{json,md,png}`` to ``--out`` (default
``results/benchmarks``, or ``results/benchmarks/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import cvxpy as cp
import matplotlib
import numpy as np
import torch
from tqdm import tqdm

import certify

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import NullLocator  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "benchmarks"
NAME = "closed_forms_vs_cvxpy"
SOLVER = cp.CLARABEL
TINY = np.finfo(np.float64).tiny


# --------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class Instances:
    """``count`` random problems for square layers of one size, as float64 tensors.

    ``r, c (B, m)``, ``h (B, n)``, ``margin (B,)`` positive, ``H (B, n, N)`` with
    ``N = max(1, size // 4)`` and ``R = X H (B, m, N)`` (always feasible).
    """

    size: int
    r: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor
    margin: torch.Tensor
    H: torch.Tensor
    R: torch.Tensor

    @property
    def count(self) -> int:
        """The number of instances ``B``."""
        return self.r.shape[0]


def draw_instances(size: int, count: int, seed: int) -> Instances:
    """Draw instances from a generator seeded by ``(seed, size)``: reproducible per size."""
    rng = np.random.default_rng([seed, size])
    m = n = size
    N = max(1, size // 4)

    def normal(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape))

    H = normal(count, n, N)
    return Instances(
        size=size,
        r=normal(count, m),
        h=normal(count, n),
        c=normal(count, m),
        margin=torch.from_numpy(rng.uniform(0.5, 2.0, count)),
        H=H,
        R=normal(count, m, n) @ H,
    )


# --------------------------------------------------------------------------- problems


def cvxpy_norm(D: cp.Variable, norm: str) -> cp.Expression:
    """The cvxpy expression of ``||D||`` for a certify norm name."""
    return {
        "fro": lambda: cp.norm(D, "fro"),
        "spectral": lambda: cp.sigma_max(D),
        "max": lambda: cp.max(cp.abs(D)),
        "sum": lambda: cp.sum(cp.abs(D)),
    }[norm]()


@dataclass(frozen=True)
class Problem:
    """One convex program: its certify closed form and its cvxpy formulation.

    ``closed_form(inst, norm)`` returns the optimal values of all instances (one batched
    call); ``constraints(D, inst, i)`` the cvxpy constraints of instance ``i``.
    """

    name: str
    norms: tuple[str, ...]
    closed_form: Callable[[Instances, str], torch.Tensor]
    constraints: Callable[[cp.Variable, Instances, int], list]

    def cvxpy_problem(self, inst: Instances, i: int, norm: str) -> cp.Problem:
        """The cvxpy problem of instance ``i``."""
        D = cp.Variable((inst.size, inst.size))
        return cp.Problem(cp.Minimize(cvxpy_norm(D, norm)), self.constraints(D, inst, i))


PROBLEMS = (
    Problem(
        name="target_change",
        norms=("fro", "spectral", "max", "sum"),
        closed_form=lambda inst, norm: certify.target_change(inst.r, inst.h, norm).value,
        constraints=lambda D, inst, i: [D @ inst.h[i].numpy() == inst.r[i].numpy()],
    ),
    Problem(
        name="margin_functional",
        norms=("fro", "spectral", "max", "sum"),
        closed_form=lambda inst, norm: certify.margin_functional(
            inst.c, inst.h, inst.margin, norm
        ).value,
        constraints=lambda D, inst, i: [
            inst.c[i].numpy() @ D @ inst.h[i].numpy() == -inst.margin[i].item()
        ],
    ),
    Problem(
        name="batch_target_change",
        norms=("fro", "spectral"),
        closed_form=lambda inst, norm: certify.batch_target_change(inst.R, inst.H, norm).value,
        constraints=lambda D, inst, i: [D @ inst.H[i].numpy() == inst.R[i].numpy()],
    ),
)


def skip_reason(problem: Problem, norm: str, size: int, args: argparse.Namespace) -> str | None:
    """Why cvxpy is not run on a cell, or ``None`` when it is."""
    if norm == "spectral" and size > args.max_sdp_size:
        return "skipped (SDP too large)"
    if norm in ("max", "sum") and size > args.max_lp_size:
        return "skipped (LP too large)"
    if problem.name == "batch_target_change":
        nonzeros = size * size * max(1, size // 4)
        if nonzeros > args.max_nonzeros:
            return f"skipped (D H = R has {nonzeros:.1e} nonzeros)"
    return None


# --------------------------------------------------------------------------- timing


def median_time(fn: Callable[[], object], min_repeats: int, min_seconds: float) -> float:
    """Median wall time of ``fn()`` after one warm-up call.

    Repeats at least ``min_repeats`` times and until ``min_seconds`` have passed.
    """
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class CvxpyRun:
    """The cvxpy solves of one cell: values, wall times and statuses per instance."""

    values: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    solver_s: list[float] = field(default_factory=list)
    status: list[str] = field(default_factory=list)


def solve_with_cvxpy(problem: Problem, inst: Instances, norm: str, budget: float) -> CvxpyRun:
    """Solve instances one at a time until ``budget`` seconds are spent (at least one)."""
    run = CvxpyRun()
    for i in range(inst.count):
        prob = problem.cvxpy_problem(inst, i, norm)
        t0 = time.perf_counter()
        prob.solve(solver=SOLVER)
        run.wall_s.append(time.perf_counter() - t0)
        run.values.append(float("nan") if prob.value is None else float(prob.value))
        run.solver_s.append(prob.solver_stats.solve_time)
        run.status.append(prob.status)
        if sum(run.wall_s) > budget:
            break
    return run


# --------------------------------------------------------------------------- one cell


@dataclass
class Cell:
    """The result of one (problem, norm, size) cell; cvxpy fields are ``None`` if skipped."""

    problem: str
    norm: str
    size: int
    instances: int
    torch_s_per_instance: float
    closed_form_values: list[float]
    cvxpy_instances: int = 0
    cvxpy_s_per_instance: float | None = None
    cvxpy_solver_s_per_instance: float | None = None
    cvxpy_values: list[float] | None = None
    cvxpy_status: list[str] | None = None
    speed_ratio: float | None = None
    rel_errors: list[float] | None = None
    max_rel_error: float | None = None
    note: str = ""


def run_cell(problem: Problem, norm: str, inst: Instances, args: argparse.Namespace) -> Cell:
    """Time the closed form on all instances and, unless skipped, cvxpy on each."""
    ours = problem.closed_form(inst, norm)
    seconds = median_time(lambda: problem.closed_form(inst, norm), args.repeats, args.min_seconds)
    cell = Cell(
        problem=problem.name,
        norm=norm,
        size=inst.size,
        instances=inst.count,
        torch_s_per_instance=seconds / inst.count,
        closed_form_values=ours.tolist(),
    )
    reason = skip_reason(problem, norm, inst.size, args)
    if reason:
        cell.note = reason
        return cell
    run = solve_with_cvxpy(problem, inst, norm, args.budget)
    solved = len(run.values)
    reference = np.asarray(run.values)
    rel = np.abs(ours.numpy()[:solved] - reference) / np.maximum(np.abs(reference), TINY)
    cell.cvxpy_instances = solved
    cell.cvxpy_s_per_instance = statistics.fmean(run.wall_s)
    cell.cvxpy_solver_s_per_instance = statistics.fmean(run.solver_s)
    cell.cvxpy_values = run.values
    cell.cvxpy_status = run.status
    cell.speed_ratio = cell.cvxpy_s_per_instance / cell.torch_s_per_instance
    cell.rel_errors = rel.tolist()
    cell.max_rel_error = float(np.max(rel))
    notes = []
    if solved < inst.count:
        notes.append(f"time budget: {solved}/{inst.count} solved")
    if any(s != cp.OPTIMAL for s in run.status):
        notes.append("status " + ", ".join(sorted(set(run.status))))
    cell.note = "; ".join(notes)
    return cell


# --------------------------------------------------------------------------- reports


def fmt(x: float | None, spec: str = ".2e") -> str:
    """Format a number for the table; ``None`` as an em dash."""
    return "—" if x is None else format(x, spec)


def markdown_table(cells: list[Cell]) -> str:
    """The results as a markdown table, one row per cell."""
    lines = [
        "| problem | norm | size | torch s/inst | cvxpy s/inst | cvxpy / torch "
        "| max rel. error | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c.problem} | {c.norm} | {c.size} | {fmt(c.torch_s_per_instance)} "
            f"| {fmt(c.cvxpy_s_per_instance)} | {fmt(c.speed_ratio, '.1e')} "
            f"| {fmt(c.max_rel_error, '.1e')} | {c.note} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    """Versions and machine details that the timings depend on."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cvxpy": cp.__version__,
        "solver": SOLVER,
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def markdown_report(cells: list[Cell], config: dict, env: dict, total_s: float) -> str:
    """A markdown document: how the numbers were taken, then the table."""
    method = (
        f"Square layers m = n = size, {config['instances']} random float64 instances per "
        f"size (seed {config['seed']}). torch: one batched call over all instances "
        f"(validation, value and minimiser), median of repeats, divided by the instance "
        f"count. cvxpy {env['cvxpy']} + {env['solver']}: wall time of `prob.solve()` "
        f"(compilation included), mean over the instances solved within a "
        f"{config['budget']:g} s budget per cell. Relative error: |ours - cvxpy| / |cvxpy| "
        f"of the optimal value, largest over instances. cvxpy is skipped for sigma_max (an "
        f"SDP) above size {config['max_sdp_size']}, for the max and sum norms (LPs) above "
        f"size {config['max_lp_size']} and for D H = R above {config['max_nonzeros']:.0e} "
        f"constraint nonzeros."
    )
    machine = (
        f"torch {env['torch']} ({env['torch_threads']} threads), Python {env['python']}, "
        f"{env['machine']}. Total run time {total_s:.0f} s."
    )
    return f"# certify closed forms vs cvxpy\n\n{method}\n\n{machine}\n\n{markdown_table(cells)}\n"


NORM_LEGEND = {"fro": "fro: Frobenius norm", "spectral": "spectral: sigma_max (an SDP for cvxpy)",
               "max": "max: entrywise max norm (an LP)", "sum": "sum: entrywise sum norm (an LP)"}
PROBLEM_TITLE = {"target_change": "target change D h = r",
                 "margin_functional": "margin functional <D, c h^T> = -m",
                 "batch_target_change": "batch D H = R"}


def plot_speed_ratio(cells: list[Cell], path: Path) -> None:
    """Speed ratio cvxpy / torch against size, log-log, one panel per problem, one line per
    norm (cells cvxpy skipped are absent)."""
    sizes = sorted({c.size for c in cells})
    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(5.5 * len(PROBLEMS), 4.2), sharey=True)
    for ax, problem in zip(axes, PROBLEMS):
        for norm in problem.norms:
            points = [
                (c.size, c.speed_ratio)
                for c in cells
                if c.problem == problem.name and c.norm == norm and c.speed_ratio is not None
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=NORM_LEGEND.get(norm, norm))
        ax.set(xscale="log", yscale="log", title=PROBLEM_TITLE.get(problem.name, problem.name),
               xlabel="layer size n (square n x n weight, m = n)",
               ylabel="speed ratio: cvxpy s / torch s per instance")
        ax.set_xticks(sizes, labels=[str(size) for size in sizes], minor=False)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_outputs(cells: list[Cell], config: dict, total_s: float, out: Path) -> None:
    """Write the JSON, markdown and PNG files to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"config": config, "environment": env, "total_seconds": total_s,
               "cells": [asdict(c) for c in cells]}
    (out / f"{NAME}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{NAME}.md").write_text(markdown_report(cells, config, env, total_s))
    plot_speed_ratio(cells, out / f"{NAME}.png")


# --------------------------------------------------------------------------- main


def progress_line(cell: Cell) -> str:
    """One line per finished cell for the progress output."""
    return (
        f"{cell.problem:>20} {cell.norm:>8} {cell.size:>5}: "
        f"torch {fmt(cell.torch_s_per_instance)} s, cvxpy {fmt(cell.cvxpy_s_per_instance)} s, "
        f"ratio {fmt(cell.speed_ratio, '.1e')}, "
        f"rel. err {fmt(cell.max_rel_error, '.1e')} {cell.note}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` overrides sizes, instances and torch timing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024],
                        help="layer sizes m = n (default: 16 64 256 1024)")
    parser.add_argument("--instances", type=int, default=4, help="instances per size (default: 4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: results/benchmarks in the repository, "
                             "results/benchmarks/quick with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test in seconds: sizes 8 16, 2 instances, short timing")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="cvxpy seconds per cell, at least one instance (default: 30)")
    parser.add_argument("--max-sdp-size", type=int, default=64,
                        help="largest size for which sigma_max (an SDP) is solved (default: 64)")
    parser.add_argument("--max-lp-size", type=int, default=256,
                        help="largest size for which the max and sum norms (LPs) are solved "
                             "(default: 256)")
    parser.add_argument("--max-nonzeros", type=float, default=5e7,
                        help="largest m*n*N for cvxpy on D H = R (default: 5e7)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default: 1, like the solver)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="minimum torch repeats per cell (default: 7)")
    parser.add_argument("--min-seconds", type=float, default=0.2,
                        help="minimum torch timing duration per cell (default: 0.2)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.instances, args.min_seconds = [8, 16], 2, 0.01
    if args.out is None:
        args.out = DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every (size, problem, norm) cell, then write and print the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    start = time.perf_counter()
    jobs = [(size, problem, norm) for size in args.sizes for problem in PROBLEMS
            for norm in problem.norms]
    cells: list[Cell] = []
    instances: dict[int, Instances] = {}
    with tqdm(jobs, unit="cell", file=sys.stderr) as bar:
        for size, problem, norm in bar:
            bar.set_description(f"{problem.name} {norm} {size}")
            if size not in instances:
                instances[size] = draw_instances(size, args.instances, args.seed)
            cells.append(run_cell(problem, norm, instances[size], args))
            bar.write(progress_line(cells[-1]))
    total_s = time.perf_counter() - start
    write_outputs(cells, config, total_s, args.out)
    print(markdown_table(cells))
    print(f"\ntotal {total_s:.1f} s; results in {args.out}")


if __name__ == "__main__":
    main()
