# Training image: torch (CUDA 13 build from PyPI, which carries its own CUDA and cuDNN libraries, so a
# slim Python base is enough; the host needs only the NVIDIA driver and container toolkit), MLflow,
# Prefect and the mnistops code. The compose stack also runs the MLflow and Prefect servers from it,
# so clients and servers always share versions.
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
    MNISTOPS_REPO_DIR=/opt/mnistops

WORKDIR /opt/mnistops

# Metadata first: the heavy dependency layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY nn_core ./nn_core
COPY serving ./serving
COPY flows ./flows
# The `server` extra: psycopg (PostgreSQL for the MLflow server's SQLAlchemy store) and boto3 (its S3
# artifact destination), server-side only.
RUN pip install '.[train,server]'

# Deployment config, for `prefect deploy` from inside the image; entrypoints are relative to here.
COPY infra/prefect.yaml ./infra/prefect.yaml

# Fail the build, not the first scheduled run, if the CLI cannot start.
RUN mnistops --help >/dev/null

# Never run as root; uid fixed so Kubernetes securityContext and volume ownership can match it.
RUN useradd --create-home --uid 10001 mnistops && mkdir -p /data/mnistops && chown mnistops /data/mnistops
USER 10001
VOLUME ["/data/mnistops"]
CMD ["mnistops", "--help"]
