# Slim inference image: onnxruntime-gpu, mlflow-skinny, pyarrow, pillow (the base dependencies,
# `.[serving]`) and the `serving` package only. No torch, no Prefect: a few hundred MB instead of GBs.
#   docker build -f infra/docker/inference.Dockerfile -t mnistops-inference .   (from the repo root)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1

WORKDIR /opt/mnistops

# Only serving/: nn_core and flows import torch and prefect, which this image must not carry.
COPY pyproject.toml README.md ./
COPY serving ./serving
RUN pip install '.[serving]'

# The image's promise, checked at build time: the batch job imports without torch.
RUN python -c "import serving.job, sys; assert 'torch' not in sys.modules, 'serving.job imported torch'" \
    && ! pip show torch >/dev/null 2>&1

RUN useradd --create-home --uid 10001 mnistops
USER 10001
# `python -m serving` is the batch job's own CLI (the `mnistops infer` flow needs Prefect, not here):
#   docker run --rm -v "$PWD/data:/data" mnistops-inference --input /data/in --output /data/out.parquet
ENTRYPOINT ["python", "-m", "serving"]
CMD ["--help"]
