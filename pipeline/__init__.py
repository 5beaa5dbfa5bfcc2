"""ctvq's runnable parts: preprocessing, training, inference, evaluation, export."""


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
