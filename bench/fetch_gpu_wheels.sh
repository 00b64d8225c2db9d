#!/usr/bin/env bash
# Fetch into .whl/ the wheels that bench/gpu_suite.sh installs on a GPU machine without a package registry:
# TRL and what it needs beyond a stock CUDA PyTorch image (datasets, the pyarrow >= 21 it needs, dill,
# multiprocess), and jsonargparse with its signature extras. Python 3.12, x86-64 Linux; about 57 MB.
# Run from any machine with pip and the registry: bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES=(trl==1.16.* datasets==5.2.* pyarrow==26.* dill==0.4.* multiprocess==0.70.19 jsonargparse==4.53.*
          docstring_parser==0.18.* typeshed_client==2.15.*)
# the wheels must never travel into a commit
if [ -d .git ] && ! grep -qx "/.whl/" .git/info/exclude 2>/dev/null; then echo "/.whl/" >> .git/info/exclude; fi
mkdir -p .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp "${platforms[@]}" -d .whl "${PACKAGES[@]}"
# one version of each: two would stop the install there
duplicates=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$duplicates" ]; then echo "more than one version in .whl of: $duplicates (remove the older)"; exit 1; fi
ls -1 .whl
du -sh .whl
