# selfsup training/evaluation image.
# Base: NVIDIA's CUDA runtime on Ubuntu 24.04 with Python from the distribution; torch comes from
# pip as a CUDA build matching the pinned torch 2.14.1 (pip wheels bundle their CUDA libraries, so
# only the driver is needed from the host). Install steps mirror the Makefile's `pip install`.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /workspace
# Dependencies first (cached layer), then the source.
COPY pyproject.toml README.md ./
COPY ssl ./ssl
COPY eval ./eval
# Same requirements as `make` (pyproject pins torch/torchvision/lightly/timm/...), not editable.
# hadolint ignore=DL3013
RUN pip install '.[plot]'
COPY recipes ./recipes
COPY launch ./launch
COPY docs ./docs

RUN useradd --create-home --uid 1000 selfsup && chown -R 1000:1000 /workspace
USER 1000

ENTRYPOINT ["/workspace/launch/entrypoint.sh"]
CMD ["help"]
