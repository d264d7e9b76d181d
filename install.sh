#!/bin/sh
# Install planner with its torch extra (profile, execute, demo) and its test tools into the
# current Python environment. To check plans only (solve, simulate, check, export), the core is
# enough and installs in seconds: pip install -e .
# On a machine without an NVIDIA GPU, PyTorch's CPU build goes in first: a bare "torch"
# requirement would otherwise pull the multi-GB CUDA build. The CPU build comes from PyTorch's
# own index when it can be reached, else from the default index (which serves a CPU build on
# some machines, and otherwise the default build).
set -eu
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$PY" -m pip install -q "torch>=2.11,<2.14"
    else
        "$PY" -m pip install -q --timeout 15 --retries 0 torch==2.13.0 \
            --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
            || "$PY" -m pip install -q torch==2.13.0
    fi
fi
# This checkout was once distributed as "planner", a name that belongs to an unrelated package on
# the public index; an old editable install of it would shadow the new one.
if "$PY" -m pip show planner 2>/dev/null | grep -qx "Editable project location: $(pwd)"; then
    "$PY" -m pip uninstall -q -y planner
fi
"$PY" -m pip install -q -e ".[torch,test]"
