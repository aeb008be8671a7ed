"""The attribution methods by family; each registered under `trustcase.attribution_methods`."""
