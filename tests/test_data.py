"""Data: completion-only masks on a real chat template, packing isolation, bad input."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_jsonl

from tpusft.data import packing, pipeline, sources
from tpusft.data.chat import encode_chat, load_tokenizer
from tpusft.data.pipeline import DataOptions, Source
from tpusft.errors import DataError
from tpusft.models.decoder import ModelArgs, create_model

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
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
    tok.chat_template = (FIXTURES / "llama3.jinja").read_text()
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


def _build(path, batch=2, train=False, fmt="auto", column_map=None, **opts):
    opts.setdefault("max_length", 64)
    opts.setdefault("num_epochs", 1)
    src = Source("d", "json", data_files=str(path), data_format=fmt, column_map=column_map or {})
    return packing.build_dataset([src], DataOptions(**opts), TOKENIZER[0], batch, train=train)


TOKENIZER = []


@pytest.fixture(autouse=True)
def _tokenizer(demo_tokenizer):
    TOKENIZER[:] = [demo_tokenizer]


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"{i}+{i % 7}="},
                          {"role": "assistant", "content": str(i + i % 7)}]} for i in range(n)]


def token_nll(logits, targets):
    """-log p(target) per position."""
    logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("strategy", ["best_fit", "first_fit"])
def test_packing_isolation_matches_examples_alone(tmp_path, strategy):
    """Per-example loss from a packed batch equals the loss of each example run alone."""
    path = write_jsonl(tmp_path / "d.jsonl", _rows(12))
    packed_ds, _ = _build(path, packing_strategy=strategy)
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


def test_unpacked_rows_are_padded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    ds, stats = _build(path, batch=4, packing=False, max_length=48)
    batch = next(iter(ds))
    assert batch["inputs"].shape == (4, 48)
    assert (batch["segment_ids"] <= 1).all() and (batch["segment_ids"].sum(1) > 20).all()
    assert stats.truncated == 0 and packing.packing_efficiency(batch) < 1


def test_truncation_right_left_and_drop(tmp_path, demo_tokenizer):
    long = "1+2+3+4+5+6+7+8+9+10+11+12="
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "78"}]},
        {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}])
    full = encode_chat(demo_tokenizer, [{"role": "user", "content": long},
                                        {"role": "assistant", "content": "78"}])
    n = 32
    assert len(full.ids) > n + 1
    left, stats = _build(path, batch=2, packing=False, max_length=n, truncation="left")
    batch = next(iter(left))
    assert batch["inputs"][0].tolist() == full.ids[-(n + 1):-1].tolist()  # keeps the answer
    assert stats.truncated == 1
    right, stats = _build(path, batch=1, packing=False, max_length=n, truncation="right")
    assert len(list(right)) == 1  # keeping the start cut the long example's answer off
    assert stats.truncated == 1 and stats.bad["no trained token within max_target_length"] == 1
    dropped, stats = _build(path, batch=1, packing=False, max_length=n, truncation="drop")
    assert len(list(dropped)) == 1 and stats.bad["over max_target_length"] == 1


def test_bad_rows_are_counted_with_an_example_or_raise(tmp_path):
    rows = _rows(6) + [{"messages": [{"role": "assistant", "content": "1"}]},
                       {"messages": [{"role": "user", "content": ""},
                                     {"role": "assistant", "content": "1"}]},
                       {"messages": "1+1=2"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds, stats = _build(path, batch=1, packing=False)
    assert len(list(ds)) == 6
    assert dict(stats.bad) == {"invalid role order": 1, "empty content": 1, "wrong type": 1}
    summary = stats.summary()
    assert "9 rows read, 3 skipped" in summary and "1 x invalid role order: e.g." in summary
    strict, _ = _build(path, batch=1, packing=False, bad_row_policy="raise")
    with pytest.raises(DataError, match="bad row .*bad_row_policy=skip"):
        list(strict)


def test_truncation_that_cuts_every_answer_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    ds, stats = _build(path, batch=4, packing=False, max_length=12)
    with pytest.raises(DataError, match="no trained token within max_target_length"):
        pipeline.first_batch_or_error(ds, stats, "eval")


def test_alpaca_rows(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "add", "input": "1+2", "output": "3"},
        {"instruction": "add", "input": "", "output": "5"}])
    ds, _ = _build(path, batch=1)
    batch = next(iter(ds))
    trained = batch["targets"][batch["weights"] > 0].tolist()
    eot = demo_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    digit = demo_tokenizer.convert_tokens_to_ids
    assert trained == [digit("3"), eot, digit("5"), eot]


def test_text_concat_then_split_trains_every_token(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i} " + "abc " * (i % 9)}
                                              for i in range(30)])
    ds, _ = _build(path, batch=2, packing_strategy="concat_then_split")
    batches = list(ds)
    assert all(packing.packing_efficiency(b) == 1.0 for b in batches[:-1])
    assert all((b["weights"][b["segment_ids"] > 0] == 1).all() for b in batches)


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        _build(tmp_path / "missing.jsonl")
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": "a", "reply": "b"}])
    with pytest.raises(DataError, match="cannot tell the data format"):
        _build(path)
    with pytest.raises(DataError, match="has no column 'messages'"):
        _build(path, fmt="messages")
    pref = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match="data_format=preference, which supervised"):
        _build(pref)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": []}) + "\n")
    ds, stats = _build(empty, train=True, num_epochs=1)
    with pytest.raises(DataError, match="yields no batch; all 1 rows were skipped"):
        pipeline.first_batch_or_error(ds, stats, "training")
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


def _cfg(*overrides):
    from tpusft.config import load_config
    from tpusft.config.loader import configs_root

    return load_config([str(configs_root() / "sft.yml"), "tokenizer_path=t", *overrides])


def test_eval_split_of_plain_files_needs_eval_files(tmp_path):
    cfg = _cfg("hf_path=json", f"hf_data_files={tmp_path}/t.jsonl", "eval_split=validation")
    with pytest.raises(DataError, match="give the eval file"):
        sources.sources(cfg, train=False)


def _user_texts(ds, tokenizer):
    """The user turn of every example of unpacked batches."""
    out = []
    for batch in ds:
        for row in batch["inputs"][batch["segment_ids"].sum(1) > 0]:
            text = tokenizer.decode(row.tolist(), skip_special_tokens=False)
            out.append(text.split("<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0])
    return out


def test_registry_mixture_max_samples_and_eval_fraction(tmp_path, demo_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", _rows(200))
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": str(i)}
                                       for i in range(200)])
    (tmp_path / "reg.yml").write_text(
        "adds: {hf_path: json, data_files: a.jsonl}\n"
        "bees: {hf_path: json, data_files: b.jsonl, data_format: alpaca, max_samples: 50}\n")
    cfg = _cfg(f"dataset_registry={tmp_path}/reg.yml", "dataset=adds:3,bees:1", "packing=false",
               "max_target_length=32", "global_batch_size=8")
    srcs, part = sources.sources(cfg, train=True)
    assert [(s.name, s.weight, s.max_samples) for s in srcs] == [("adds", 3, None),
                                                                  ("bees", 1, 50)]
    ds, _ = packing.build_dataset(srcs, sources.options(cfg, train=True), demo_tokenizer, 8,
                                   train=True, part=part)
    it = iter(ds)
    texts = _user_texts([next(it) for _ in range(25)], demo_tokenizer)
    bees = [t for t in texts if t.startswith("b")]
    assert 0.15 < len(bees) / len(texts) < 0.35  # weight 1 of 4
    assert all(int(t[1:]) < 50 for t in bees)  # max_samples
    assert sources.sources(cfg, train=False)[0] == []  # no member has eval data

    with pytest.raises(Exception, match="did you mean adds"):
        sources.sources(_cfg(f"dataset_registry={tmp_path}/reg.yml", "dataset=add"), train=True)

    cfg = _cfg("hf_path=json", f"hf_data_files={tmp_path}/a.jsonl", "eval_fraction=0.1",
               "packing=false", "max_target_length=32")
    seen = {}
    for train in (True, False):
        srcs, part = sources.sources(cfg, train=train)
        ds, _ = packing.build_dataset(srcs, sources.options(cfg, train=False), demo_tokenizer,
                                       4, train=False, part=part)
        seen[train] = _user_texts(ds, demo_tokenizer)
    assert len(seen[False]) == 20 and len(seen[True]) == 180
    assert not set(seen[True]) & set(seen[False])


def test_resumed_iterator_yields_exactly_the_same_batches(tmp_path, demo_tokenizer):
    """A pipeline restored from a saved iterator state yields the token ids the uninterrupted
    one yields, batch for batch (mixture, shuffling, packing and prefetch included)."""
    write_jsonl(tmp_path / "a.jsonl", _rows(60))
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": str(i)}
                                       for i in range(40)])
    srcs = [Source("a", "json", data_files=str(tmp_path / "a.jsonl"), weight=2),
            Source("b", "json", data_files=str(tmp_path / "b.jsonl"))]
    opts = DataOptions(max_length=48, seed=5)

    def fresh():
        return iter(packing.build_dataset(srcs, opts, demo_tokenizer, 4, train=True)[0])

    it = fresh()
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(30)]  # several epochs of both sources

    resumed = fresh()
    resumed.set_state(state)
    got = [next(resumed)["inputs"] for _ in range(30)]
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_shipped_registry_is_valid():
    from tpusft.data import formats

    registry, _ = sources.load_registry("configs/datasets.yml")
    assert {"alpaca", "gsm8k", "ultrachat_200k", "orca_dpo_pairs"} <= set(registry)
    for entry in registry.values():
        assert entry.get("data_format", "auto") in formats.DATA_FORMATS
        formats.parse_column_map(entry.get("column_map"))
