"""Test setup: 8 simulated CPU devices so that sharding is real; tiny generated assets."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

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


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 600):
    """Runs `python -m module args` with this interpreter; returns the CompletedProcess."""
    # One CPU device unless a test asks for more (this process simulates 8).
    full_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                    **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
