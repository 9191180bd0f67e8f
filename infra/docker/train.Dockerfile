# Training image: torch (CUDA 13 build from PyPI, which carries its own CUDA and cuDNN libraries, so a
# slim Python base is enough; the host needs only the NVIDIA driver and container toolkit), MLflow,
# Prefect, onnxruntime-gpu and the mnistops code. The compose stack also runs the MLflow and Prefect
# servers from it, so clients and servers always share versions.
#   docker build -f infra/docker/train.Dockerfile -t mnistops-train .        (from the repo root)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MNISTOPS_HOME=/data/mnistops \
    MNISTOPS_DATA_DIR=/data/cache

WORKDIR /opt/mnistops

# The dependencies (~6.7 GB) in a layer of their own, before any code: it is rebuilt only when
# pyproject.toml or README.md change. With no package folder here yet, setuptools finds no package
# and pip installs the dependencies and the project's metadata only (the inference image does the
# same, and tests/test_infra_images.py runs that). `gpu`: onnxruntime-gpu, whose CUDA/cuDNN extras
# are the libraries torch already brings; `server`: psycopg (PostgreSQL for the MLflow server's
# SQLAlchemy store) and boto3 (its S3 artifact destination).
COPY pyproject.toml README.md ./
RUN pip install '.[train,gpu,server]'

# Then the code; a code change reinstalls only mnistops itself (seconds).
COPY nn_core ./nn_core
COPY common ./common
COPY serving ./serving
COPY flows ./flows
RUN pip install --no-deps --force-reinstall .

# Deployment config, for `prefect deploy` from inside the image (entrypoints are module paths).
COPY infra/prefect.yaml ./infra/prefect.yaml

# Fail the build, not the first scheduled run, if the CLI cannot start.
RUN mnistops --help >/dev/null

# Never run as root; uid fixed so Kubernetes securityContext and volume ownership can match it. The
# image creates and owns its data folders: MNISTOPS_HOME (MLflow store, checkpoints, outputs; the
# pull step of infra/prefect.yaml works in it) and the dataset cache. A named volume mounted there
# starts as a copy of them, ownership included.
RUN useradd --create-home --uid 10001 mnistops \
    && mkdir -p /data/mnistops /data/cache && chown mnistops /data/mnistops /data/cache
USER 10001
WORKDIR /data/mnistops
VOLUME ["/data/mnistops", "/data/cache"]
CMD ["mnistops", "--help"]
