# prior_dist for GPU clusters, on a CUDA PyTorch base image whose torch matches the pin.
#   docker build -t prior_dist .            (EXTRAS=viz,test to skip building flash-attn)
#   docker run --gpus all --ipc=host -v $PWD/shards:/app/shards -v $PWD/runs:/app/runs prior_dist \
#     deepspeed launch/pretrain.py --config configs/zero2.json
ARG BASE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-devel
FROM ${BASE}
ARG EXTRAS=gpu,viz,test
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 \
    TOKENIZERS_PARALLELISM=false MAX_JOBS=8
RUN apt-get update && apt-get install -y --no-install-recommends git numactl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependencies first, so code changes do not re-install them. flash-attn (the `gpu` extra)
# compiles against the image's torch; without it the encoders use PyTorch SDPA.
COPY pyproject.toml README.md ./
RUN mkdir -p prior_dist && touch prior_dist/__init__.py \
    && pip install --no-cache-dir -e ".[${EXTRAS}]" --no-build-isolation
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
CMD ["deepspeed", "launch/pretrain.py", "--config", "configs/zero2.json"]
