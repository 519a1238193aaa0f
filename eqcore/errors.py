"""eqcore's own exception types."""


class FormatError(ValueError):
    """A quantized tensor or file is malformed."""


class ClusterError(RuntimeError):
    """A Dask cluster failed under a conversion (workers lost too often, scheduler gone)."""
