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


SESSION_START = None


def pytest_sessionstart(session):
    import time
    global SESSION_START
    SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    _remove_orphaned_semaphores()


def _remove_orphaned_semaphores():
    """The fault tests kill servers on purpose; a killed server that ran a compiled graph leaves
    the named semaphores Ray made for its channels (/dev/shm/sem.hdr<pid>-N, sem.obj<pid>-N).
    Remove those this session made whose process is gone (a live one's are left alone)."""
    import re
    from pathlib import Path
    shm = Path("/dev/shm")
    if SESSION_START is None or not shm.is_dir():
        return
    for path in shm.glob("sem.*"):
        m = re.fullmatch(r"sem\.(hdr|obj)(\d+)-\d+", path.name)
        try:
            if m and not Path(f"/proc/{m.group(2)}").exists() and path.stat().st_mtime >= SESSION_START:
                path.unlink()
        except OSError:  # gone meanwhile, or not ours to remove
            pass
