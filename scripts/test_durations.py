"""Refresh tests/durations.json from the JUnit reports of the last `bash scripts/test.sh`.

scripts/test.sh writes test-results/parallel.xml; this sums each test file's seconds
(setup + call + teardown of its tests, as measured beside the other xdist worker)
and writes them to tests/durations.json, which conftest.py uses to hand the longest files to
the xdist workers first. Run it after a full suite on the CI machine:

    .venv/bin/python scripts/test_durations.py
"""

from __future__ import annotations

import collections
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    report = ROOT / "test-results" / "parallel.xml"
    if not report.exists():
        sys.exit(f"{report} not found: run `bash scripts/test.sh` first")
    seconds: collections.Counter[str] = collections.Counter()
    for case in ET.parse(report).getroot().iter("testcase"):
        module = (case.get("classname") or "").split(".")
        file = next((m for m in reversed(module) if m.startswith("test_")), None)
        if file:
            seconds[f"{file}.py"] += float(case.get("time") or 0.0)
    out = ROOT / "tests" / "durations.json"
    doc = json.loads(out.read_text())
    doc["seconds"] = {k: round(v, 1) for k, v in seconds.most_common()}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{out.relative_to(ROOT)}: {len(seconds)} files, {sum(seconds.values()):.0f} s in all; longest "
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.most_common(3)))


if __name__ == "__main__":
    main()
