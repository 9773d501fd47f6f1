"""Writes the field policy table (deployments/policy.py's `markdown()`, the one generator) into docs/api.md between
its field-policy markers: `python scripts/field_table.py` after changing a policy; `--check` exits 1 when stale."""

import argparse
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"(<!-- field-policy:begin[^\n]*-->\n)(.*?)(\n<!-- field-policy:end -->)", re.S)


def rendered(text: str) -> str:
    """`text` (docs/api.md) with the table between the markers replaced by the policy's table."""
    from deployments.policy import markdown

    if not BLOCK.search(text):
        raise SystemExit(f"{DOC}: the field-policy markers are missing")
    return BLOCK.sub(lambda m: m.group(1) + markdown() + m.group(3), text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only say whether docs/api.md's table is current")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    new = rendered(text)
    if args.check:
        print("docs/api.md: field table " + ("current" if new == text else "stale: run python scripts/field_table.py"))
        return int(new != text)
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
