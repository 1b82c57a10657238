"""Process start-up: tcmalloc preloading for the launchers and the benchmark scripts."""

import os
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
