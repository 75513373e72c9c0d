#!/usr/bin/env python3
"""A stand-in for `nsys` in CPU tests: `profile ... --output BASE CMD...` runs CMD and writes
BASE.nsys-rep; `stats ... --output BASE REP` copies the committed CSV fixtures (captured from a
real run on the GPU machine) to BASE_<report>.csv, as nsys stats does."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(os.environ.get("FAKE_NSYS_FIXTURES", Path(__file__).parent / "fixtures" / "nsys"))
args = sys.argv[1:]
verb = args[0]
base = args[args.index("--output") + 1]
if verb == "profile":
    cmd = args[args.index("--output") + 2:]
    rc = subprocess.call(cmd)
    Path(base + ".nsys-rep").write_bytes(b"fake report")
    sys.exit(rc)
if verb == "stats":
    reports = args[args.index("--report") + 1].split(",")
    for name in reports:
        src = FIXTURES / f"{os.environ.get('FAKE_NSYS_CASE', 'q8')}_{name}.csv"
        if src.is_file():
            shutil.copyfile(src, f"{base}_{name}.csv")
    sys.exit(0)
sys.exit(f"fake nsys: unknown verb {verb}")
