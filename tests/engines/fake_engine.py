"""A stand-in for an external engine binary (tests/engines/fake.toml): greedy tokens derived from
the prompt, a JSON dump of its steps like ds4's --dump-logprobs, and a speed line like ds4's.
FAKE_GARBAGE=1 answers other tokens (a broken toggle); FAKE_NOISE=1 moves the logprobs a little
but not the tokens (a healthy one); FAKE_FAIL=1 exits 3."""
import argparse
import hashlib
import json
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--prompt", required=True)
ap.add_argument("-n", type=int, required=True)
ap.add_argument("--dump", required=True)
a = ap.parse_args()
if not os.path.isfile(a.model):
    sys.exit(f"fake: cannot open model {a.model}")
if os.environ.get("FAKE_FAIL"):
    print("fake: simulated failure", file=sys.stderr)
    sys.exit(3)
h = int(hashlib.sha256(a.prompt.encode()).hexdigest(), 16) % 997
shift = 101 if os.environ.get("FAKE_GARBAGE") else 0
noise = 0.01 if os.environ.get("FAKE_NOISE") else 0.0
t0 = time.perf_counter()
steps = []
for i in range(a.n):
    tok = (h + 31 * i + shift) % 300
    top = [{"id": tok, "logprob": -0.05 - noise}] + [{"id": (tok + j) % 300, "logprob": -2.0 * j - noise}
                                                   for j in range(1, 5)]
    steps.append({"selected": {"id": tok}, "top_logprobs": top})
with open(a.dump, "w") as fh:
    json.dump({"steps": steps}, fh)
gen = a.n / max(time.perf_counter() - t0, 1e-6) / 1e3
print(f"fake: prefill: {123.4 + len(a.prompt):.1f} t/s, generation: {gen:.1f} t/s", file=sys.stderr)
