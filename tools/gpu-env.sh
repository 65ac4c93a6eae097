# Source on a lent GPU machine: our pinned wheels (.whl/, see gpu-check.sh) and our
# packages on PYTHONPATH, beside the machine's CUDA torch.
mkdir -p "${OUT:-/tmp/gpu-check}" /tmp/pp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
ln -sfn "$PWD/clients/cachesvc_client" /tmp/pp/cachesvc_client
ln -sfn "$PWD/bench" /tmp/pp/cachesvc_bench
ln -sfn "$PWD/connectors/cachesvc_connectors" /tmp/pp/cachesvc_connectors
export PYTHONPATH=/tmp/site:$PWD:/tmp/pp PYTHONUNBUFFERED=1
