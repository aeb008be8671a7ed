# trustcase in a container: the `trustcase` command, Graphviz and the PDF libraries, no data, no weights.
#
#   docker build -t trustcase .
#   docker run --rm -v /srv/cases/welding:/case:ro -v /srv/trustcase:/work trustcase \
#       assess /case/use_case.yaml --out /work/out --tracking-uri sqlite:////work/mlflow.db
#   docker run -d --name trustcase-watch --network trustcase -e PREFECT_API_URL=http://prefect:4200/api \
#       -e MLFLOW_TRACKING_URI=http://mlflow:5000 -v /srv/cases/welding:/case:ro -v /srv/trustcase:/work \
#       trustcase watch /case/use_case.yaml --cron "0 2 * * *" --out /work/out
#   docker run --rm -p 127.0.0.1:8765:8765 -v /srv/cases/welding:/case:ro -v /srv/trustcase:/work trustcase \
#       explore /case/use_case.yaml --host 0.0.0.0 --token "$SECRET" --tracking-uri sqlite:////work/mlflow.db
# (docs/deployment.md has the whole set-up: Prefect server and MLflow tracking server on PostgreSQL.)
FROM python:3.11-slim-bookworm

# Nothing leaves the machine: telemetry and update checks off for every process of the image.
ENV DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    NO_ALBUMENTATIONS_UPDATE=1 \
    HF_HUB_OFFLINE=1 \
    GIT_PYTHON_REFRESH=quiet \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_LOGGING_LEVEL=WARNING

# Graphviz draws the safety argument; Pango, HarfBuzz and a font let WeasyPrint write the PDF.
RUN apt-get update \
 && apt-get install -y --no-install-recommends graphviz libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 \
      fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/trustcase
# torch first and exactly this version, from the CPU wheel index: a looser requirement pulls CUDA (GBs)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml constraints.txt README.md* ./
COPY trustcase/ trustcase/
# use-case code (YAML, loaders, model definitions, training scripts); .dockerignore keeps data and weights out
COPY use_cases/ use_cases/
# editable, so that `trustcase` finds use_cases/ beside the package; no `demo` extra: no data in the image
RUN pip install -c constraints.txt -e ".[scale]"

RUN useradd --create-home --uid 10001 trustcase && mkdir -p /work && chown trustcase /work
USER trustcase
WORKDIR /work
ENV PREFECT_HOME=/work/.prefect
# `trustcase explore` (the web lab) listens here
EXPOSE 8765
ENTRYPOINT ["trustcase"]
CMD ["--help"]
