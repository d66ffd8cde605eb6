#!/usr/bin/env bash
# Download, here, the wheels ferry needs that the lent GPU machine's image lacks
# (Python 3.12, x86-64, no network there): pydantic for the config, and fastapi + uvicorn
# for the server. They land in .whl/ (git-ignored); scripts/gpu_session.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  "pydantic==2.13.4" "pydantic-core==2.46.4" "annotated-types==0.7.0" "typing-inspection==0.4.2" \
  "fastapi==0.165.0" "starlette==1.10.0" "uvicorn==0.54.0"
ls -l .whl
