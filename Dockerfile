# prior_dist for GPU clusters: CUDA runtime, Python 3.11, the pinned torch stack and the project.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential git numactl \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Dependencies first, so code changes do not re-install torch.
COPY pyproject.toml README.md ./
RUN mkdir -p prior_dist && touch prior_dist/__init__.py && pip install --no-cache-dir -e ".[test]" \
    && pip install --no-cache-dir "triton>=3.0"
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
# flash-attn is optional (`pip install -e ".[gpu]"` builds it from source, which takes long);
# without it the encoders use PyTorch SDPA.
CMD ["python", "-m", "prior_dist.shardify", "--help"]
