"""The science: pure computation on models and data. No Prefect, no MLflow, no reports."""
