# distill, CPU image. For GPUs, swap the base and the torch wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t distill:gpu .
# (a CUDA base needs python3.11 and pip installed first; the pytorch/pytorch images already have them).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

RUN groupadd --gid 1000 distill && useradd --uid 1000 --gid distill --create-home --shell /bin/bash distill

WORKDIR /opt/distill
# torch first, from the wheel index the build names, so nothing else pulls a different build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY launch ./launch
COPY bench ./bench
COPY configs ./configs
RUN pip install . && chown -R distill:distill /opt/distill

USER distill
WORKDIR /home/distill
ENTRYPOINT ["distill"]
CMD ["--help"]
