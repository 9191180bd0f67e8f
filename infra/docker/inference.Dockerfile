# Slim inference image: the `serving` package and its dependencies (numpy, mlflow-skinny, pyarrow,
# pillow) with one ONNX runtime. No torch, no Prefect: a few hundred MB instead of GBs.
#   docker build -f infra/docker/inference.Dockerfile -t mnistops-inference .                (CPU)
#   docker build -f infra/docker/inference.Dockerfile --build-arg RUNTIME=gpu -t mnistops-inference:gpu .
# (from the repo root). tests/test_infra_images.py runs this file's steps in a fresh venv in CI.
FROM python:3.11-slim

# The pyproject.toml extra that brings the runtime: `serving` = onnxruntime (CPU, 23 MB), `gpu` =
# onnxruntime-gpu with its CUDA 13 / cuDNN 9 wheels (GBs; the host needs the NVIDIA driver and
# container toolkit: `docker run --gpus all ... --device cuda`). Never both: they share a folder.
ARG RUNTIME=serving

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1

WORKDIR /opt/mnistops

# Dependencies first, in a layer that changes only with pyproject.toml: with no package folder here
# yet, setuptools finds no package and pip installs the dependencies and the project's metadata.
COPY pyproject.toml README.md ./
RUN pip install ".[${RUNTIME}]"

# Then the code, common/ and serving/ only (nn_core and flows import torch and Prefect): reinstalled alone.
COPY common ./common
COPY serving ./serving
RUN pip install --no-deps --force-reinstall .

# The image's promise, checked at build time: the batch job imports without torch.
RUN python -c "import serving.job, sys; assert 'torch' not in sys.modules, 'serving.job imported torch'" \
    && ! pip show torch >/dev/null 2>&1

# Never root; the image creates and owns its data folder (mount inputs and outputs there).
RUN useradd --create-home --uid 10001 mnistops && mkdir -p /data && chown mnistops /data
USER 10001
WORKDIR /data
# `python -m serving` is the batch job's own CLI (the `mnistops infer` flow needs Prefect, not here):
#   docker run --rm -v "$PWD/data:/data" mnistops-inference --model /data/model.onnx \
#       --input /data/in.npy --output /data/out.parquet --no-track
ENTRYPOINT ["python", "-m", "serving"]
CMD ["--help"]
