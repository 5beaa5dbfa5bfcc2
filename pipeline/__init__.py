"""ctvq's runnable parts: preprocessing, training, inference, evaluation, export."""


def lazy_names(module: str, homes: dict):
    """A module ``__getattr__`` (PEP 562) that imports each name of ``homes`` (name -> the module
    that defines it) on first use: a command line that imports ``module`` answers ``--help``
    without loading torch and MONAI."""

    def __getattr__(name: str):
        if name in homes:
            import importlib

            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def quiet_fx_notice() -> None:
    """Silences torch's one-time ``is_fx_tracing`` notice, which spconv's tensor class triggers on every
    first ``SparseConvTensor`` (nothing here traces with torch.fx)."""
    import logging

    from torch.fx import _symbolic_trace as fx

    notice = getattr(fx, "is_fx_tracing_warning", None)
    if notice is None or not hasattr(notice, "cache_info") or notice.cache_info().currsize:
        return
    level = fx.log.level
    fx.log.setLevel(logging.ERROR)
    try:
        notice()  # cached from now on: torch prints it at most once per process
    finally:
        fx.log.setLevel(level)
