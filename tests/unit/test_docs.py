"""The README and docs/ hold together: the README opens with the two commands (`.ci/run` runs the second), and
every relative Markdown link resolves to a file and, with a #fragment, to one of its headings."""

import re

from tests.helpers import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a "# comment" in a code block is no heading
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_resolves():
    broken = []
    for doc in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("k8s/**/*.md")]:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            name, _, fragment = target.partition("#")
            path = (doc.parent / name).resolve() if name else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n")[:6]
    assert head[2:5] == ["```bash", "pip install -c constraints.txt -e . && serve run configs/local.yaml",
                         'pip install -c constraints.txt -e ".[test]" && ruff check . && python -m pytest -q']
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -F 'pip install -c constraints.txt -e \".[test]\"' README.md" in ci
