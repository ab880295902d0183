#!/bin/sh
# Builder-stage helper: install the workspace members into the environment a deps stage made
# (`uv sync` adds only what is missing: the members, from the sources), then stage what they added
# (the `cornserve` namespace, their metadata and commands) in /overlay for the final image.
# Arguments: the `uv sync` selection (--package ..., --extra ...).
set -eu
cd /src
/opt/uv/bin/uv sync --locked --no-dev --no-editable "$@"
cd /opt/cornserve
mkdir -p /overlay
cp -a --parents bin/cornserve* lib/python3.11/site-packages/cornserve \
  lib/python3.11/site-packages/cornserve_*.dist-info /overlay/
