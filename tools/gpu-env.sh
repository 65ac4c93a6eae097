# Source on a lent GPU machine: our pinned wheels (.whl/, see gpu-check.sh) and our
# packages on PYTHONPATH, beside the machine's CUDA torch.
mkdir -p "${OUT:-/tmp/gpu-check}" /tmp/pp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
# The source roots, as the wheel lays them out. Nothing is pip-installed, so no
# `cachesvc.commands` entry point exists: run benchmarks as `python3 -m cachesvc_bench`.
export PYTHONPATH=/tmp/site:$PWD:$PWD/clients:$PWD/connectors:$PWD/bench:$PWD/lab PYTHONUNBUFFERED=1
