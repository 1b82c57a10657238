"""Process start-up: tcmalloc preloading for the launchers and the benchmark scripts."""

import os
import re
import subprocess
import sys

import pytest

from tpusft import launch

needs_tcmalloc = pytest.mark.skipif(launch.tcmalloc_library() is None,
                                    reason="libtcmalloc_minimal is not installed")


@needs_tcmalloc
def test_tcmalloc_env_preloads_ahead_of_what_is_there_once():
    lib = launch.tcmalloc_library()
    env = launch.tcmalloc_env({"LD_PRELOAD": "/other.so", "X": "1"})
    assert env == {"LD_PRELOAD": f"{lib}:/other.so", "X": "1"}
    assert launch.tcmalloc_env(env) == env
    assert launch.tcmalloc_env({})["LD_PRELOAD"] == lib


@needs_tcmalloc
@pytest.mark.parametrize("opt_out", [False, True])
def test_a_script_restarts_itself_with_tcmalloc(tmp_path, opt_out):
    script = tmp_path / "script.py"
    script.write_text("import os, sys\nfrom tpusft.launch import reexec_with_tcmalloc\n"
                      "reexec_with_tcmalloc()\nprint(sys.argv[1:], os.environ.get('LD_PRELOAD'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TPUSFT_NO_TCMALLOC")}
    if opt_out:
        env["TPUSFT_NO_TCMALLOC"] = "1"
    out = subprocess.run([sys.executable, str(script), "a", "--b=1"], capture_output=True,
                         text=True, env=env, check=True).stdout.strip()
    assert out == ("['a', '--b=1'] None" if opt_out
                   else f"['a', '--b=1'] {launch.tcmalloc_library()}")


# ------------------------------------------------------------------ multi-process start-up
def _cfg(*args):
    from tpusft.config import load_config

    return load_config(["configs/demo/sft.yml", *args])


def test_a_run_is_multi_process_when_keys_or_environment_say_so():
    from tpusft.distributed import initialize_arguments

    assert initialize_arguments(_cfg(), {}) is None  # one process, as ever
    keys = initialize_arguments(_cfg("coordinator_address=10.0.0.2:1234", "num_processes=4",
                                     "process_id=3", "distributed_timeout_s=60"), {})
    assert keys == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3,
                    "initialization_timeout": 60, "heartbeat_timeout_seconds": 60}
    env = {"JAX_COORDINATOR_ADDRESS": "h0:8476", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert initialize_arguments(_cfg(), env)["coordinator_address"] == "h0:8476"
    assert initialize_arguments(_cfg(), env)["process_id"] == 1
    # keys win over the environment; one process named is one process
    assert initialize_arguments(_cfg("coordinator_address=a:1", "num_processes=1",
                                     "process_id=0"), env) is None
    # a TPU pod (GKE/xpk set TPU_WORKER_HOSTNAMES) or distributed=true: JAX finds the rest
    pod = initialize_arguments(_cfg(), {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    assert pod == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 300}
    assert initialize_arguments(_cfg(), {"TPU_WORKER_HOSTNAMES": "w0"}) is None
    assert initialize_arguments(_cfg(), {"TPU_WORKER_HOSTNAMES": "w0",
                                         "MEGASCALE_NUM_SLICES": "2"}) == pod
    assert initialize_arguments(_cfg("distributed=true"), {}) is not None


@pytest.mark.parametrize("args, env, message", [
    (("num_processes=2", "process_id=0"), {}, "coordinator_address not given"),
    (("coordinator_address=a:1", "num_processes=2", "process_id=2"), {},
     "process_id=2 is outside 0..1"),
    ((), {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_an_incomplete_multi_process_setting_is_one_line(args, env, message):
    from tpusft.distributed import initialize_arguments
    from tpusft.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        initialize_arguments(_cfg(*args), env)


def test_one_process_gathers_and_agrees_with_itself():
    import numpy as np

    from tpusft import distributed

    assert distributed.gather_json({"next_index": 3}) == [{"next_index": 3}]
    np.testing.assert_array_equal(distributed.allgather(np.array([1.0, 2.0])), [[1.0, 2.0]])
    distributed.sync("nothing to wait for")


def test_libtpu_without_a_tpu_means_the_cpu():
    """This machine has no TPU: with libtpu installed, JAX is told to use the CPU."""
    import importlib.util

    env: dict = {}
    launch.skip_tpu_search_without_tpu(env)
    has_libtpu = importlib.util.find_spec("libtpu") is not None
    assert env == ({"JAX_PLATFORMS": "cpu"} if has_libtpu else {})
    chosen = {"JAX_PLATFORMS": "tpu"}
    launch.skip_tpu_search_without_tpu(chosen)
    assert chosen == {"JAX_PLATFORMS": "tpu"}  # an explicit choice stays
