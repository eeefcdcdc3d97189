# selfsup training/evaluation image (GPU; also runs on a CPU-only host).
#
# Base: nvidia/cuda *base* (not runtime, not devel) on Ubuntu 24.04. The pinned torch 2.14.1 /
# torchvision 0.29.1 wheels from PyPI are CUDA 13.0 builds that bring their own CUDA libraries
# (cuda-toolkit 13.0.x, cuDNN, NCCL as pip packages), so a `runtime` base would only add a second
# copy of cuBLAS & co. What the base image does give: NVIDIA_VISIBLE_DEVICES /
# NVIDIA_DRIVER_CAPABILITIES=compute,utility, which the NVIDIA container toolkit (docker --gpus)
# and enroot/pyxis need to mount the host driver and nvidia-smi (launch/torchrun.sh counts GPUs
# with it), and NVIDIA_REQUIRE_CUDA=cuda>=13.0, which turns "driver too old for these wheels"
# into a clear error at `docker run` instead of a CUDA init failure mid-job.
# python:3.11-slim + the same wheels would work under docker --gpus but not under enroot's hook.
FROM nvidia/cuda:13.0.1-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.10); a venv because the system Python
# is "externally managed" (PEP 668).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The same pip steps as `make` (Makefile: upgrade pip, then pip install '.[dev,plot]'), minus
# -e (the image holds an installed copy, not a checkout) and minus `dev` (test tools). The
# requirements are pyproject.toml's pins and nothing else, so image and venv cannot drift.
# Two rounds so that the ~4 GB of dependencies form a layer that only pyproject.toml invalidates:
# first against an empty package skeleton, then the real sources with --no-deps.
# pip settings for builds behind a mirror or a TLS-intercepting proxy (unset unless passed with
# --build-arg; an unset ARG is not in the environment): e.g. PIP_CERT=/path/of/a/mounted/CA-bundle,
# PIP_EXTRA_INDEX_URL=file:///mounted/wheel/index. launch/image.sh passes the caller's through.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_TRUSTED_HOST

WORKDIR /opt/selfsup
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir -p ssl/selfsup eval/selfsup_eval \
    && touch ssl/selfsup/__init__.py eval/selfsup_eval/__init__.py \
    && pip install --upgrade pip \
    && pip install '.[plot]' \
    && pip uninstall -y selfsup \
    && rm -rf ssl eval build
COPY ssl ./ssl
COPY eval ./eval
# hadolint ignore=DL3013
RUN pip install --no-deps '.[plot]' && rm -rf build

WORKDIR /workspace
COPY recipes ./recipes
COPY launch ./launch
COPY docs ./docs

# Non-root; uid 1000 matches the first user of most hosts, so files written to bind mounts
# (runs/, shards) stay owned by that user. Ubuntu 24.04 images already have a user `ubuntu` with
# uid 1000: it makes way. /workspace is writable for relative run.dir paths.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && useradd --create-home --uid 1000 --user-group selfsup \
    && mkdir -p /workspace/runs \
    && chown -R selfsup:selfsup /workspace
# numeric, so that runAsNonRoot (Kubernetes) can verify it without reading /etc/passwd
USER 1000:1000

ENTRYPOINT ["/workspace/launch/entrypoint.sh"]
CMD ["help"]
