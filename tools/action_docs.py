"""Keep README's generated tables in step with their sources: each action's inputs and outputs (action.yml) and
the configuration reference (swiftci's typed config, as `swiftci schema --format md` prints it).

    python tools/action_docs.py          # rewrite the tables in README.md
    python tools/action_docs.py --check  # exit 1 when README.md and the sources disagree (run by the tests)

The tables sit between `<!-- action-docs:NAME -->` and `<!-- /action-docs:NAME -->` markers, one pair per folder
in actions/, and between `<!-- config-reference -->` and `<!-- /config-reference -->`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(action: Path) -> str:
    spec = yaml.safe_load(action.read_text())
    lines = ["| input | required | default | description |", "|---|:-:|---|---|"]
    for name, inp in (spec.get("inputs") or {}).items():
        default = inp.get("default", "")
        shown = f"`{default}`" if default != "" else '`""`'
        lines.append(f"| `{name}` | {'yes' if inp.get('required') else 'no'} | {_cell(shown)} | "
                     f"{_cell(inp.get('description', ''))} |")
    lines += ["", "| output | description |", "|---|---|"]
    for name, out in (spec.get("outputs") or {}).items():
        lines.append(f"| `{name}` | {_cell(out.get('description', ''))} |")
    return "\n".join(lines)


def _replace(readme: str, start: str, end: str, text: str) -> str:
    if start not in readme:
        raise SystemExit(f"README.md has no {start} … {end} section")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _m: f"{start}\n{text.rstrip()}\n{end}", readme)


def render(readme: str) -> str:
    for action in sorted(ROOT.glob("actions/*/action.yml")):
        name = action.parent.name
        readme = _replace(readme, f"<!-- action-docs:{name} -->", f"<!-- /action-docs:{name} -->", table(action))
    sys.path.insert(0, str(ROOT))
    from swiftci.config import reference_markdown

    return _replace(readme, "<!-- config-reference -->", "<!-- /config-reference -->", reference_markdown())


def main() -> None:
    current = README.read_text()
    wanted = render(current)
    if "--check" in sys.argv:
        if wanted != current:
            sys.exit("README.md's generated tables differ from actions/*/action.yml or swiftci/config.py; run: "
                     "python tools/action_docs.py")
        print("README.md's generated tables are up to date")
        return
    README.write_text(wanted)
    print("README.md's generated tables rewritten")


if __name__ == "__main__":
    main()
