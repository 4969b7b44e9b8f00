# cvtk-job: one image for train / inference / evaluate / validate / doctor.
#
#   docker build -t cvtk-job .                      # CUDA 13 (Turing .. Blackwell), torch 2.13.0+cu130
#   docker build -t cvtk-job:cu126 --build-arg BASE_DEVEL=nvidia/cuda:12.6.3-cudnn-devel-ubuntu24.04 \
#       --build-arg BASE_RUNTIME=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#       --build-arg TORCH_CUDA_ARCH_LIST="7.0 7.5 8.0 8.6 8.9 9.0+PTX" .   # Volta clusters
#   docker run --gpus all cvtk-job train --label … --train … --output_weights s3://…/x.pth
#
# Pins come from requirements/constraints.txt, the same file `make setup` and CI use. mmcv 2.1.0 has no
# wheel on PyPI: the build stage compiles its CUDA ops (tens of minutes per architecture list), unless
# a ready mmcv wheel is put into wheels/ (any wheel there is preferred over PyPI).

ARG BASE_DEVEL=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
ARG BASE_RUNTIME=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_DEVEL} AS build
ARG TORCH_INDEX_URL=""
ARG TORCH_CUDA_ARCH_LIST="7.5 8.0 8.6 8.9 9.0 10.0 12.0+PTX"
# Extra pip arguments, e.g. "--no-index" to build offline from wheels/ only.
ARG PIP_ARGS=""
ARG BUILD_PACKAGES="python3 python3-venv python3-dev build-essential ninja-build git"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A base that already has the packages (an offline mirror, a prepared base) skips apt entirely.
# hadolint ignore=DL3008
RUN dpkg -s ${BUILD_PACKAGES} >/dev/null 2>&1 || { apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${BUILD_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*; }
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY requirements/ /src/requirements/
COPY wheels/ /wheels/
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install ${PIP_ARGS} --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
       -c /src/requirements/constraints.txt torch numpy \
    && pip install ${PIP_ARGS} --find-links /wheels -r /src/requirements/mmcv-build.txt
# mmcv with compiled ops (CUDA ops when the base has nvcc), from wheels/ when one is there. Its pin is
# in the constraints file.
# hadolint ignore=DL3013
RUN MMCV_WHEEL="$(ls /wheels/mmcv-*.whl 2>/dev/null || true)"; \
    if [ -n "$MMCV_WHEEL" ]; then \
        pip install ${PIP_ARGS} --no-deps "$MMCV_WHEEL"; \
    elif command -v nvcc >/dev/null; then \
        FORCE_CUDA=1 MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
        pip install ${PIP_ARGS} --no-build-isolation --no-deps -c /src/requirements/constraints.txt mmcv; \
    else \
        MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" \
        pip install ${PIP_ARGS} --no-build-isolation --no-deps -c /src/requirements/constraints.txt mmcv; \
    fi
# mmcv's setup.py compiles with -g: debug symbols are nearly all of its one extension (measured here:
# 83 MB -> 2.2 MB for the CPU build, 109 MB -> 27 MB for CUDA ops for sm_90 alone).
RUN if command -v strip >/dev/null; then find /opt/venv -path '*/mmcv/_ext*.so' -exec strip --strip-debug {} +; fi
# The project's own dependencies, read from pyproject.toml, before any source is copied: a change to
# cvtk_job/ leaves this stage (and the ~2 GB venv the runtime stage copies from it) cached.
COPY pyproject.toml /src/
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /src/requirements/runtime.txt \
    && pip install ${PIP_ARGS} --find-links /wheels -c /src/requirements/constraints.txt -r /src/requirements/runtime.txt

# cvtk-job itself, as a wheel the runtime stage installs on top of the copied venv (a few hundred kB).
FROM build AS app
COPY pyproject.toml README.md entrypoint.py /src/
COPY cvtk_job/ /src/cvtk_job/
RUN pip wheel ${PIP_ARGS} --find-links /wheels --no-deps -w /dist /src \
    && pip install --no-deps /dist/cvtk_job-*.whl \
    && python -c "import mmcv.ops, mmdet, cvtk_job"

# Pretrained COCO checkpoints baked in for offline clusters: PRETRAINED="mask-rcnn_r101_fpn_1x_coco …"
FROM app AS pretrained
ARG PRETRAINED=""
RUN mkdir -p /opt/cvtk-job/checkpoints \
    && CVTK_JOB_PRETRAINED_DIR=/opt/cvtk-job/checkpoints python -m cvtk_job.pretrained ${PRETRAINED}

FROM ${BASE_RUNTIME} AS runtime
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/cvtk-job/cvtk-job
ARG RUNTIME_PACKAGES="python3 libgl1 libglib2.0-0 ca-certificates"
LABEL org.opencontainers.image.title="cvtk-job" \
      org.opencontainers.image.description="MMDetection training and inference as batch jobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN dpkg -s ${RUNTIME_PACKAGES} >/dev/null 2>&1 || { apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${RUNTIME_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*; }
COPY --from=build /opt/venv /opt/venv
RUN --mount=type=bind,from=app,source=/dist,target=/dist \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/venv/bin/pip install --no-deps --no-index /dist/cvtk_job-*.whl
COPY --from=pretrained /opt/cvtk-job/checkpoints /opt/cvtk-job/checkpoints
COPY entrypoint.py /app/entrypoint.py
# Any UID (OpenShift, Apptainer, --user) and a read-only root filesystem: everything written goes
# under /tmp (mount a tmpfs or emptyDir there) or the output mounts.
# expandable_segments: batches of varying image sizes and instance counts (Mask R-CNN's targets grow with
# the objects in an image) fragment PyTorch's fixed-size CUDA blocks, and a run dies of OOM with memory
# free in pieces; growable segments avoid that (PyTorch's CUDA semantics notes). Not yet measured here
# against the default (no GPU lent): bench/run.py --gpu reports peak memory to compare.
ENV PATH=/opt/venv/bin:$PATH \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    CVTK_JOB_CACHE=/tmp/cvtk-job \
    CVTK_JOB_PRETRAINED_DIR=/opt/cvtk-job/checkpoints \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["/opt/venv/bin/python", "/app/entrypoint.py"]
CMD ["--help"]
