"""Two JAX processes on one machine each read their own shard: disjoint, together all rows."""

import json
import os
import socket
import subprocess
import sys

from conftest import REPO, write_jsonl


def test_processes_read_disjoint_shards_that_cover_the_data(tmp_path, demo_assets):
    rows = [{"messages": [{"role": "user", "content": f"{i}+0="},
                          {"role": "assistant", "content": str(i)}]} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "multihost_reader.py"), str(port), str(i),
         str(data), str(demo_assets / "tokenizer"), str(tmp_path / f"p{i}.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [(r["process_index"], r["process_count"]) for r in results] == [(0, 2), (1, 2)]
    a, b = (set(r["seen"]) for r in results)
    assert len(a) == len(b) == 20 and not a & b
    assert a | b == {f"{i}+0=" for i in range(40)}
