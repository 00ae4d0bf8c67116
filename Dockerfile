# syntax=docker/dockerfile:1
# CPU image of GREAM Serve (transformers engine; `--build-arg EXTRAS=vllm` adds vLLM's CPU build).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=""
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY model_store ./model_store
COPY training ./training
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-compile ".${EXTRAS:+[$EXTRAS]}" \
 && (/opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec || true)

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 gream
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    GREAM_BUNDLE=/bundles/current GREAM_HOST=0.0.0.0 GREAM_PORT=8000 VLLM_CPU_KVCACHE_SPACE=1
USER gream
WORKDIR /home/gream
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["gream", "serve"]
