import os

import numpy as np
import pytest

# Keep BLAS to one thread per process: tests run beside Ray workers on 2 cores.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    from dptrain import backend
    if backend.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs cupy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ray_local():
    """The session's shared local Ray (4 logical CPUs on this 2-core machine), started on first use."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
