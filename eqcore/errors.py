"""eqcore's own exception types."""


class FormatError(ValueError):
    """A quantized tensor or file is malformed."""
