import pytest

from eqcore.backends import gpu_available
from eqcore.tensor import QuantizedTensor


@pytest.fixture(autouse=True)
def _validate_what_quantize_builds(monkeypatch):
    """eqcore's quantizer assembles its results without validating them (QuantizedTensor.built:
    valid by construction); in the tests every one is validated, so a result that is not fails."""
    unchecked = QuantizedTensor.built.__func__

    def built(cls, *args, **kwargs):
        qt = unchecked(cls, *args, **kwargs)
        qt.validate()
        return qt

    monkeypatch.setattr(QuantizedTensor, "built", classmethod(built))


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
