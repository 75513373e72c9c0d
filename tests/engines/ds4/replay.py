#!/usr/bin/env python3
"""A stand-in for the ds4 binary (as $DS4_BIN) that replays what the real one printed and dumped
on flash-4l (the files beside this one; README.md says how they were recorded). It checks that
it was called as the ds4 adapters call ds4 (greedy, thinking off, no system prompt, a model
file), then writes the recorded --dump-logprobs steps (the first -n of them) or prints the
recorded speed run's output. Unknown flags end it as ds4 ends: exit 2."""
import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser(add_help=False)
ap.add_argument("--cpu", action="store_true")
ap.add_argument("--cuda", action="store_true")
ap.add_argument("-m", required=True)
ap.add_argument("-p", required=True)
ap.add_argument("-n", type=int, required=True)
ap.add_argument("-c", type=int, required=True)
ap.add_argument("--temp", required=True)
ap.add_argument("--nothink", action="store_true")
ap.add_argument("-sys")
ap.add_argument("--dump-logprobs")
ap.add_argument("--logprobs-top-k", type=int, default=20)
a, unknown = ap.parse_known_args()
if unknown:
    sys.exit(f"ds4: unknown option: {unknown[0]}")
if a.temp != "0" or not a.nothink or a.sys != "" or a.cpu == a.cuda:
    sys.exit("replay: not called as the ds4 adapters call ds4 (--temp 0 --nothink -sys '' and one backend)")
if not os.path.isfile(a.m):
    sys.exit(f"ds4: failed to open model '{a.m}': No such file or directory")
if a.dump_logprobs:
    doc = json.loads((HERE / "flash-4l-cpu.dump.json").read_text())
    doc["steps"] = [{**s, "top_logprobs": s["top_logprobs"][:a.logprobs_top_k]} for s in doc["steps"][:a.n]]
    Path(a.dump_logprobs).write_text(json.dumps(doc))
    sys.stderr.write((HERE / "flash-4l-cpu.dump.stderr").read_text())
else:
    sys.stdout.write((HERE / "flash-4l-cpu.speed.stdout").read_text())
    sys.stderr.write((HERE / "flash-4l-cpu.speed.stderr").read_text())
