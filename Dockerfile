# facecaption Airflow image: the official Airflow image plus the facecaption package.
#
#   docker build -t facecaption-airflow .                                          # CPU (default)
#   docker build --build-arg FACECAPTION_EXTRAS=celery,gpu,llm -t facecaption-airflow:gpu .
#
# Extends the official image the documented way: system packages as root, then
# `pip install` as the `airflow` user, pinning apache-airflow to the image's version so
# pip can never up- or downgrade Airflow itself.
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

# Which extras of facecaption to install (pyproject.toml): celery for the CeleryExecutor, cpu
# or gpu for the detect/attribute runtime, llm (torch + transformers) for in-process captions.
ARG FACECAPTION_EXTRAS=celery,cpu,llm
# torch comes from the PyTorch CPU index; the PyPI wheel would drag in GBs of CUDA libs.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

USER root
# build-essential: for dependencies without a wheel for the image's platform (insightface
# before 2.x shipped only an sdist with C++ extensions; 2.1 is a pure wheel).
# libgl1 + libglib2.0-0: shared libraries opencv-python needs at import time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libgl1 libglib2.0-0 \
    && apt-get autoremove -yqq --purge \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# Directories docker-compose mounts named volumes on. Creating them here (owner airflow,
# group 0, group-writable like the rest of /opt/airflow) means fresh named volumes
# inherit that ownership, so any AIRFLOW_UID running with group 0 can write to them.
RUN mkdir -p /opt/facecaption \
             /opt/airflow/facecaption-data \
             /opt/airflow/facecaption-home \
    && chown airflow:0 /opt/facecaption \
                       /opt/airflow/facecaption-data \
                       /opt/airflow/facecaption-home \
    && chmod 775 /opt/facecaption \
                 /opt/airflow/facecaption-data \
                 /opt/airflow/facecaption-home
USER airflow

# 1) CPU torch first, in its own layer: a big download that rarely changes. Once it is
#    installed, the project's `torch==...` requirement is already satisfied, so the next
#    step does not fetch the CUDA build from PyPI.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2) The project. Only what the build needs is copied (dags/ is mounted by docker-compose),
#    so editing a DAG does not invalidate this layer. sql/ is packaged into the wheel as
#    facecaption/sql, plugins/facecaption_airflow as facecaption_airflow, whose plugin the
#    wheel's `airflow.plugins` entry point registers (see pyproject.toml).
WORKDIR /opt/facecaption
COPY --chown=airflow:0 pyproject.toml README.md ./
COPY --chown=airflow:0 facecaption/ ./facecaption/
COPY --chown=airflow:0 sql/ ./sql/
COPY --chown=airflow:0 plugins/facecaption_airflow/ ./plugins/facecaption_airflow/
# Re-stating both pins makes pip fail loudly rather than swap Airflow or pull a CUDA
# torch if some dependency ever asks for a different version.
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        "torch==${TORCH_VERSION}" \
        ".[${FACECAPTION_EXTRAS}]"
# insightface depends on the CPU onnxruntime; on GPU images it comes without its dependencies
# (the gpu extra lists the rest) so onnxruntime-gpu stays the only onnxruntime.
RUN case ",${FACECAPTION_EXTRAS}," in \
        *,gpu,*) pip install --no-cache-dir --no-deps insightface ;; \
    esac

WORKDIR /opt/airflow

# Defaults; docker-compose sets these too (plus FACECAPTION_DB_URL).
ENV FACECAPTION_HOME=/opt/airflow/facecaption-home \
    FACECAPTION_STORE_ROOT=/opt/airflow/facecaption-data
