"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link, a broken
anchor or an API reference to a missing name fails it), the README stays a short front door
whose links work, and what the pages quote exists: repository paths, ``certify.*`` names,
every module in the API reference, every command-line option on the CLI page.

Needs the ``docs`` extra (``pip install -e '.[docs]'``); without it the build fails, it is
not skipped."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["index", "concepts", "models", "operators", "certificate", "cli", "testing", "ray-gpu",
         "examples", "benchmarks", "layout", "development", "changelog", "api"]
SUBPACKAGES = ["closed_forms", "graph", "formats", "capture", "bounds", "radii", "certificate",
               "check", "attacks", "models", "testing", "cli"]
# The changelog quotes the old module paths on purpose.
QUOTING = [ROOT / "README.md", *(p for p in sorted(DOCS.rglob("*.md")) if p.name != "changelog.md")]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        cwd=config.parent, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def page_html(site: Path, page: str) -> Path:
    """The built file of ``docs/page`` (``.md``), as MkDocs writes directory URLs."""
    stem = page.removesuffix(".md")
    if stem == "index" or stem.endswith("/index"):
        return site / f"{stem}.html"
    return site / stem / "index.html"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    done = build(ROOT / "mkdocs.yml", site)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return site


def test_the_site_builds_with_every_page(site):
    for page in PAGES:
        assert page_html(site, f"{page}/index.md" if page == "api" else f"{page}.md").is_file()
    for package in SUBPACKAGES:
        assert page_html(site, f"api/{package}.md").is_file()


def test_every_public_name_is_in_the_api_reference(site):
    for package in SUBPACKAGES:
        html = page_html(site, f"api/{package}.md").read_text()
        module = importlib.import_module(f"certify.{package}")
        assert module.__all__, package
        for name in module.__all__:
            assert f'id="certify.{package}.{name}"' in html, f"certify.{package}.{name}"


def test_every_module_is_in_the_api_reference():
    referenced = set(re.findall(r"^::: ([\w.]+)$", "\n".join(
        p.read_text() for p in (DOCS / "api").glob("*.md")), re.M))
    modules = set()
    for path in (ROOT / "certify").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert modules - referenced == set()


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    # The same configuration on a copy of the pages, with one broken link and one broken
    # anchor planted: the strict build must refuse both.
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(DOCS, tmp_path / "docs")
    # The package beside it: a snippet includes its schema, the hook imports it.
    (tmp_path / "certify").symlink_to(ROOT / "certify", target_is_directory=True)
    with (tmp_path / "docs" / "index.md").open("a") as page:
        page.write("\n[gone](no-such-page.md) and [nowhere](concepts.md#no-such-section)\n")
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr and "#no-such-section" in done.stderr


def test_the_readme_is_a_short_front_door(site):
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = [link for link in LINK.findall(readme) if "://" not in link]
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), link
        if anchor:  # a docs page's heading: its id in the built page
            assert path.startswith("docs/") and path.endswith(".md"), link
            html = page_html(site, path.removeprefix("docs/")).read_text()
            assert f'id="{anchor}"' in html, link


def quoted(pattern: str) -> set[tuple[str, str]]:
    """(page, match) for every code span of the README and the docs that matches."""
    found = set()
    for page in QUOTING:
        for span in CODE.findall(page.read_text()):
            found |= {(page.name, m) for m in re.findall(pattern, span)}
    return found


def test_every_quoted_repository_path_exists():
    paths = quoted(r"^(?:certify|tests|benchmarks|examples|proofs|docs|\.ci)/[\w/.*-]*"
                   r"(?:\.\w+|/)$")
    assert len(paths) > 40
    missing = [(page, path) for page, path in sorted(paths) if not list(ROOT.glob(path))]
    assert missing == []


def resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_every_quoted_certify_name_exists():
    names = quoted(r"(?<![\w/.])certify(?:\.[A-Za-z_]\w*)+")
    assert len(names) > 40
    assert [(page, name) for page, name in sorted(names) if not resolves(name)] == []


def test_the_cli_page_names_every_command_and_option(capsys, monkeypatch):
    from certify.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # one line of usage per command, nothing wrapped
    page = (DOCS / "cli.md").read_text()
    assert main(["--help"]) == 0
    commands = re.search(r"\{([\w,]+)\}", capsys.readouterr().out).group(1).split(",")
    assert {"prove", "model", "check", "backdoor", "demo"} <= set(commands)
    for command in commands:
        assert f"\n## certify {command}\n" in page, command
        assert main([command, "--help"]) == 0
        usage = capsys.readouterr().out.split("\n\n", 1)[0]
        options = set(re.findall(r"--[a-z][a-z-]*[a-z]", usage)) - {"--help"}
        assert options
        assert [o for o in sorted(options) if f"`{o}" not in page] == [], command


def test_the_operators_page_is_generated_from_the_registries(site, capsys):
    """Every operator class a graph holds has a numpy twin and a row; every ATen operator
    capture reads has a row; the built page and ``certify operators`` show the same table."""
    from certify.capture.aten import BUILDERS
    from certify.check.operators import TWINS
    from certify.cli import main
    from certify.cli.operators import operator_rows, table
    from certify.graph import operators
    from certify.graph.operators.base import Operator

    classes = {name for name in operators.__all__
               if isinstance(getattr(operators, name), type)
               and issubclass(getattr(operators, name), Operator)}
    bases = {"Operator", "LinearMap"}
    assert {name for name, *_ in operator_rows()} == classes - bases
    assert all(getattr(operators, name) in TWINS for name in classes - bases)
    text = table()
    for target in BUILDERS:
        if hasattr(target, "overloads"):
            assert f"`aten.{target.__name__}`" in text
    assert main(["operators"]) == 0
    assert capsys.readouterr().out == text
    html = page_html(site, "operators.md").read_text()
    assert "certify operators --&gt;" not in html and "<!-- certify operators" not in html
    for name, *_ in operator_rows():
        assert f"<code>{name}</code>" in html
