"""The DAG: Prefect tasks wrapping components, MLflow logging, schedules."""
