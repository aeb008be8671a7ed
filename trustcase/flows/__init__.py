"""The DAG: Prefect tasks wrapping the checks, MLflow logging, schedules."""
