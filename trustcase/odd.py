"""The ODD monitor at run time, beside the model in production: no Prefect, no MLflow.

    from trustcase.odd import Monitor
    monitor = Monitor.load("monitor.safetensors")          # the model file it was fitted for, hash-checked
    decisions = monitor.evaluate(images)                   # (H, W), (H, W, C) or (B, H, W, C), pixel space
    for i in range(len(decisions)):
        print(decisions.record(i))                         # state IN / NEAR / OUT, reasons, prediction

`Monitor.load(path, model=...)` takes another copy of the model file (or a loaded Classifier); a model with
another hash, or a file of another schema version, is rejected with `MonitorError`.
"""

from trustcase.components.odd import (
    DESCRIPTORS,
    SCHEMA_VERSION,
    Decisions,
    LearnedMonitor,
    Monitor,
    MonitorError,
    SpecificationMonitor,
    State,
    fit,
)

__all__ = ["DESCRIPTORS", "SCHEMA_VERSION", "Decisions", "LearnedMonitor", "Monitor", "MonitorError",
           "SpecificationMonitor", "State", "fit"]
