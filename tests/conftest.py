"""Test setup: 8 simulated CPU devices so that sharding is real; tiny generated assets."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# libtpu (the test extra's jax[tpu], for compile-only TPU runs) would otherwise make JAX look
# for a TPU first; compile-only runs ask libtpu for their topology's devices directly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# ... and this process and the commands it starts may each load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One XLA compilation cache, shared with the commands tests start and kept between sessions
# (the same tiny programs are compiled by many tests and processes, and again by the next
# session): $XDG_CACHE_HOME/tpusft/test-xla. Every program is cached, however quick to
# compile. Entries are keyed by the program, the flags and the jax/jaxlib versions, so a
# changed program is compiled anew. JAX's own size limit is left off (its eviction races
# with the other processes writing the cache); instead the session's first process trims
# the oldest entries beyond 4 GiB. TPUSFT_TEST_XLA_CACHE=off starts every session cold.
CACHE_LIMIT = 4 * 2**30
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get(
        "TPUSFT_TEST_XLA_CACHE") != "off":
    _cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpusft"
    _cache = _cache / "test-xla"
    _cache.mkdir(parents=True, exist_ok=True)
    if "PYTEST_XDIST_WORKER" not in os.environ:  # before any worker starts
        _entries = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in _cache.iterdir()
                          if p.is_file())
        _total = sum(size for _, size, _ in _entries)
        for _, size, path in _entries:
            if _total <= CACHE_LIMIT:
                break
            path.unlink(missing_ok=True)
            _total -= size
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's tokenizer and data, generated once per session."""
    from tpusft.demo import arithmetic

    return arithmetic.ensure_assets(str(tmp_path_factory.mktemp("out")))


@pytest.fixture(scope="session")
def demo_tokenizer(demo_assets):
    from tpusft.data.chat import load_tokenizer

    return load_tokenizer(str(demo_assets / "tokenizer"))


# When each program was lowered to MLIR (a persistent compilation cache hit is still lowered
# first), for the no-recompilation checks. Register the listener per run: Tunix's metrics
# logger clears jax.monitoring's listeners on close.
LOWERED: list[float] = []


def record_lowering(event: str, _duration: float, **_) -> None:
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
        LOWERED.append(time.perf_counter())


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 600):
    """Runs `python -m module args` with this interpreter; returns the CompletedProcess."""
    # One CPU device unless a test asks for more (this process simulates 8).
    full_env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(main, *args: str) -> subprocess.CompletedProcess:
    """Runs a tpusft command's main(args) in this process through the same one-line error
    wrapper as the command line (faster than a fresh interpreter for error checks)."""
    import contextlib
    import io

    from tpusft.errors import run_cli as wrapper

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            wrapper(main, list(args))
        except SystemExit as e:
            code = e.code or 0
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)


@pytest.fixture()
def gcs_emulator(tmp_path):
    """A local GCS emulator (gcp-storage-emulator) on a free loopback port."""
    port = free_port()
    launcher = REPO / "tests" / "gcs_emulator.py"
    proc = subprocess.Popen([sys.executable, str(launcher), str(port), "tpusft-test"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_port(port)
    # gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST; Orbax's tensorstore reads
    # TENSORSTORE_GCS_HTTP_URL and skips credentials with a fixed token.
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test"}
    yield env
    proc.terminate()
    proc.wait(timeout=10)


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first (in file order), the quick ones after: with several
    xdist workers the longest tests then start together and the short ones fill the gaps,
    instead of a several-minute test starting last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
