# Concentric for GPU hosts. Build: docker build -t concentric .   (see README, Deployment)
# The checkpoint and configs/ are mounted at run time, never baked in. With no checkpoint
# configured, the built-in dev model is generated into the /cache volume at first start.

ARG CUDA_BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# ---- build: the package as a wheel ------------------------------------------------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY policies ./policies
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime: CUDA, a CUDA build of torch, the wheel, a non-root user --------------------------
FROM ${CUDA_BASE} AS runtime
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    CONCENTRIC_CACHE=/cache \
    CONCENTRIC_HOST=0.0.0.0 \
    CONCENTRIC_DEVICE=cuda
# Unpinned on purpose: the base image pins the distribution; these follow its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.4"
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl "nvidia-ml-py>=12" && rm -rf /wheels
RUN useradd --create-home --uid 10001 concentric \
    && mkdir -p /cache /etc/concentric /models \
    && chown 10001:10001 /cache
USER 10001
WORKDIR /home/concentric
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["concentric", "serve", "--config", "/etc/concentric/server.yaml"]
