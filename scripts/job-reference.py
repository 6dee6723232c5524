"""Write docs/job.md, the job file's reference, from the schema in plugins/module_utils/job.py.

Usage: python scripts/job-reference.py [--check]
Without arguments docs/job.md is rewritten; with --check nothing is written and the exit status is 1
when docs/job.md differs from what the schema gives (the unit tests check the same).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".collections"))
from ansible_collections.cicc.cloud.plugins.module_utils import job  # noqa: E402

DOC = ROOT / "docs" / "job.md"


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    text = job.reference()
    current = DOC.read_text(encoding="utf-8") if DOC.exists() else None
    if argv == ["--check"]:
        if current != text:
            print(f"{DOC.relative_to(ROOT)} is stale: run python scripts/job-reference.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
