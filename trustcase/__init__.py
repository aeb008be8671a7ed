"""trustcase: how far a trained neural network can be trusted in its use case, with evidence."""

import os

# Nothing leaves the machine: telemetry and update checks off before any dependency is imported.
for _k, _v in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    # a loaded 2-core machine can take longer than Prefect's default 20 s to start its local server
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_k, _v)

__version__ = "0.1.0"
