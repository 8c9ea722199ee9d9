"""``certify operators``: what capture reads and what each operator certifies, generated from
the registries themselves (``certify.capture.aten.BUILDERS``, the operator classes of
``certify.graph.operators`` and the checker's ``TWINS``), so the table in ``docs/operators.md``
cannot drift from the code (``tests/cli/test_operator_table.py`` compares them)."""

from __future__ import annotations

import inspect

# The rules an operator may hold (certify.graph.operators.base.Operator), as the table names
# them; a rule counts where the class overrides the base's default.
RULES = {"interval": "interval", "backward": "linear", "enclose": "enclosure",
         "jacobian": "Jacobian", "lipschitz": "Lipschitz", "local_reach": "local reach",
         "ball_offset": "ball offset"}


def _summary(obj) -> str:
    """The first sentence of a docstring, on one line."""
    doc = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    return doc.split(". ")[0].rstrip(".").replace("|", "\\|")


def operator_rows() -> list[tuple[str, str, list[str], str]]:
    """``(name, summary, rules, twin)`` of every operator class a graph can hold."""
    from certify.check.operators import TWINS
    from certify.graph import operators
    from certify.graph.operators.base import Operator

    rows = []
    for name in sorted(operators.__all__, key=str.lower):
        cls = getattr(operators, name)
        if not (inspect.isclass(cls) and issubclass(cls, Operator)) or cls not in TWINS:
            continue  # the bases (Operator, LinearMap) and helpers
        rules = [label for rule, label in RULES.items()
                 if getattr(cls, rule) is not getattr(Operator, rule)]
        rows.append((name, _summary(cls), rules, TWINS[cls].__name__))
    return rows


def aten_rows() -> list[tuple[str, str]]:
    """``(ATen operator, the capture rule that reads it)``, dropped copies included."""
    from certify.capture.aten import BUILDERS, IDENTITIES

    rows = []
    for target, rule in BUILDERS.items():
        name = getattr(target, "__name__", str(target))
        if not hasattr(target, "overloads"):  # operator.getitem: a Python builtin
            continue
        where = f"{rule.__module__.rsplit('.', 1)[-1]}.{rule.__qualname__.split('.')[0]}"
        rows.append((f"aten.{name}", where))
    rows += [(f"aten.{getattr(t, '__name__', t)}", "dropped (a copy)") for t in IDENTITIES]
    return sorted(rows)


def table() -> str:
    """Both tables in Markdown."""
    lines = ["| operator | what it computes | rules | numpy twin |", "|---|---|---|---|"]
    for name, summary, rules, twin in operator_rows():
        lines.append(f"| `{name}` | {summary} | {', '.join(rules)} | `{twin}` |")
    lines += ["", "| ATen operator | read by |", "|---|---|"]
    lines += [f"| `{name}` | `{where}` |" for name, where in aten_rows()]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    print(table(), end="")
    return 0


def add_command(command) -> None:
    p = command("operators", "print the operators certify captures and certifies, and the "
                "rules each holds (a Markdown table)")
    p.set_defaults(run=run)
