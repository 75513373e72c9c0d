#!/usr/bin/env bash
# Prepares what a GPU run needs that the GPU machine lacks, in the project's root:
#   .whl/  Python wheels (CPython 3.12, x86-64) for packages missing there
#   .debs/ Debian libraries that Nsight Systems' report importer needs there
# Both folders are added to .git/info/exclude; name them in the run's `carry`.
# On the GPU machine, start the command with:  source .whl/gpu-env.sh (this script copies it there)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.debs/' .git/info/exclude 2>/dev/null || echo '/.debs/' >> .git/info/exclude
mkdir -p .whl .debs
here=$(dirname "$(readlink -f "$0")")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl -r "$here/wheels.txt" "$@"
(cd .debs && apt-get download libdw1 libelf1 >/dev/null 2>&1 || { apt-get update -qq && apt-get download libdw1 libelf1; })
cp "$here/gpu-env.sh" .whl/gpu-env.sh
du -sh .whl .debs
