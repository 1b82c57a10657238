"""One process of tests/test_multihost_data.py: joins a 2-process JAX job on this machine,
reads its shard of the training data for one epoch, and writes the user turns it saw."""

import json
import sys

import jax


def main(port: str, process_id: str, data: str, tokenizer: str, out: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id))
    from tpusft.data import packing
    from tpusft.data.chat import load_tokenizer
    from tpusft.data.pipeline import DataOptions, Source

    tok = load_tokenizer(tokenizer)
    ds, _ = packing.build_dataset([Source("d", "json", data_files=data)],
                                   DataOptions(max_length=32, packing=False, num_epochs=1),
                                   tok, 1, train=True)
    seen = []
    for batch in ds:
        text = tok.decode(batch["inputs"][0].tolist())
        seen.append(text.split("<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0])
    with open(out, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "seen": seen}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
