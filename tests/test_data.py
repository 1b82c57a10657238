"""Data: completion-only masks on a real chat template, packing isolation, bad input."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_jsonl

from tpusft.data import pipeline
from tpusft.data.chat import encode_chat, load_tokenizer
from tpusft.errors import DataError
from tpusft.models.decoder import ModelArgs, create_model
from tpusft.training.loss import token_nll

FIXTURES = Path(__file__).parent / "fixtures"
CONVERSATION = [
    {"role": "system", "content": "you are terse."},
    {"role": "user", "content": "2+2="},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 10+5?"},
    {"role": "assistant", "content": "15, easy."},
]


@pytest.fixture()
def llama3_tokenizer(demo_tokenizer):
    """The demo tokenizer carrying Meta Llama 3 Instruct's published chat template."""
    import copy

    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = (FIXTURES / "llama3_chat_template.jinja").read_text()
    return tok


def test_completion_mask_token_by_token(llama3_tokenizer):
    tok = llama3_tokenizer
    enc = encode_chat(tok, CONVERSATION, completion_only=True)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    trained = enc.ids[enc.trained].tolist()
    expected = []
    for m in CONVERSATION:
        if m["role"] == "assistant":
            expected += tok(m["content"], add_special_tokens=False)["input_ids"] + [eot]
    assert trained == expected
    # Every other token (BOS, headers, system and user turns, their end-of-turn) is masked.
    assert (~enc.trained).sum() == len(enc.ids) - len(expected)
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(enc.ids.tolist()) == rendered
    masked_text = tok.decode(enc.ids[~enc.trained].tolist())
    assert "you are terse." in masked_text and "and 10+5?" in masked_text
    assert "15, easy." not in masked_text


def test_completion_only_off_trains_everything(llama3_tokenizer):
    enc = encode_chat(llama3_tokenizer, CONVERSATION, completion_only=False)
    assert enc.trained.all()


def _spec(path, **kw):
    base = dict(hf_path="json", split="train", data_files=str(path), hf_name=None,
                data_format="auto", columns=None, max_length=64, packing=True,
                completion_only=True, seed=0, num_epochs=1)
    base.update(kw)
    return pipeline.DataSpec(**base)


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"{i}+{i % 7}="},
                          {"role": "assistant", "content": str(i + i % 7)}]} for i in range(n)]


def test_packing_isolation_matches_examples_alone(tmp_path, demo_tokenizer):
    """Per-example loss from a packed batch equals the loss of each example run alone."""
    path = write_jsonl(tmp_path / "d.jsonl", _rows(12))
    packed_ds, _ = pipeline.build_dataset(_spec(path), demo_tokenizer, 2, train=False)
    batch = next(iter(packed_ds))
    segs = batch["segment_ids"]
    assert segs.max() >= 2, "the test needs several examples packed in one row"

    args = ModelArgs(family="llama3", vocab_size=64, emb_dim=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, mlp_dim=64, norm_eps=1e-5, rope_theta=1e4,
                     tie_embeddings=False)
    model = create_model(args, None, seed=3)
    logits, _ = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), None, None,
                      jnp.asarray(segs))
    nll = np.asarray(token_nll(logits, jnp.asarray(batch["targets"]))) * batch["weights"]

    checked = 0
    for row in range(segs.shape[0]):
        for seg in range(1, segs[row].max() + 1):
            sel = segs[row] == seg
            ids, tgt, w = (batch[k][row][sel] for k in ("inputs", "targets", "weights"))
            pos = batch["positions"][row][sel]
            assert pos.tolist() == list(range(sel.sum()))  # positions restart per example
            alone, _ = model(jnp.asarray(ids)[None], jnp.asarray(pos)[None])
            alone_nll = np.asarray(token_nll(alone, jnp.asarray(tgt)[None]))[0] * w
            np.testing.assert_allclose(nll[row][sel], alone_nll, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 4


def test_unpacked_rows_are_padded(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    ds, stats = pipeline.build_dataset(_spec(path, packing=False, max_length=48), demo_tokenizer,
                                       4, train=False)
    batch = next(iter(ds))
    assert batch["inputs"].shape == (4, 48)
    assert (batch["segment_ids"] <= 1).all() and (batch["segment_ids"].sum(1) > 20).all()
    assert stats.truncated == 0


def test_truncation_that_cuts_every_answer_is_an_error(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    ds, stats = pipeline.build_dataset(_spec(path, packing=False, max_length=12), demo_tokenizer,
                                       4, train=False)
    with pytest.raises(DataError, match="no trained token within max_target_length"):
        pipeline.first_batch_or_error(ds, stats, "eval")


def test_alpaca_rows(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "add", "input": "1+2", "output": "3"},
        {"instruction": "add", "input": "", "output": "5"}])
    ds, _ = pipeline.build_dataset(_spec(path), demo_tokenizer, 1, train=False)
    batch = next(iter(ds))
    trained = batch["targets"][batch["weights"] > 0].tolist()
    eot = demo_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    digit = demo_tokenizer.convert_tokens_to_ids
    assert trained == [digit("3"), eot, digit("5"), eot]


def test_data_errors(tmp_path, demo_tokenizer):
    with pytest.raises(DataError, match="no file matches"):
        pipeline.build_dataset(_spec(tmp_path / "missing.jsonl"), demo_tokenizer, 2, train=True)
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "reply": "b"}])
    with pytest.raises(DataError, match="cannot tell the data format"):
        pipeline.build_dataset(_spec(path), demo_tokenizer, 2, train=True)
    with pytest.raises(DataError, match="has no column 'messages'"):
        pipeline.build_dataset(_spec(path, data_format="messages"), demo_tokenizer, 2, train=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": []}) + "\n")
    ds, stats = pipeline.build_dataset(_spec(empty), demo_tokenizer, 2, train=True)
    with pytest.raises(DataError, match="yields no batch; all 1 rows were dropped"):
        pipeline.first_batch_or_error(ds, stats, "training")
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


def test_eval_split_of_plain_files_needs_eval_files(tmp_path):
    from tpusft.config import load_config
    from tpusft.config.loader import configs_root

    cfg = load_config([str(configs_root() / "sft.yml"), "hf_path=json",
                       f"hf_data_files={tmp_path}/t.jsonl", "tokenizer_path=t",
                       "eval_split=validation"])
    with pytest.raises(DataError, match="give the eval file"):
        pipeline.data_spec(cfg, train=False)
