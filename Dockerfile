# One image for every flywheel service (api, Celery worker, Prefect worker, dashboard).
#   CPU (default):  docker build -t flywheel .
#   CUDA:           docker build --build-arg VARIANT=cu128 -t flywheel:cuda .
# No secret is baked in: every setting comes from the environment at run time (.env).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu, or a CUDA wheel index of PyTorch (cu126, cu128, ...).
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLYWHEEL_HOME=/data/flywheel \
    PREFECT_HOME=/data/prefect

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 flywheel \
    && mkdir -p /data/flywheel /data/prefect \
    && chown -R flywheel /data

WORKDIR /opt/flywheel
# torch first, from the variant's index: any other spec would pull a different build.
RUN pip install --index-url "https://download.pytorch.org/whl/${VARIANT}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml README.md ./
COPY flywheel ./flywheel
COPY model ./model
COPY training ./training
COPY retrieval ./retrieval
COPY dashboard ./dashboard
COPY migrations ./migrations
RUN pip install . && python -c "import flywheel, dashboard, migrations"

USER flywheel
EXPOSE 8000 8501
HEALTHCHECK NONE
CMD ["flywheel", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
