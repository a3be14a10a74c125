"""Sources, cleaning, de-duplication, shards and the window loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmkit import io
from llmkit.data.clean import drop_exact_duplicates, drop_near_duplicates, normalize
from llmkit.data.loader import WindowLoader, check_tokenizer, load_meta
from llmkit.data.prepare import prepare
from llmkit.data.sources import clean_play_markdown, read_source, shakespeare
from llmkit.data.split import split_documents
from llmkit.errors import LlmkitError


def test_shakespeare_is_every_play_cleaned_of_markdown():
    plays = shakespeare()
    assert len(plays) == 38
    assert {p.meta["genre"] for p in plays} == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    hamlet = next(p for p in plays if p.meta["play"] == "hamlet").text
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    for play in plays:
        assert not any(mark in play.text for mark in ("**", "__", "\\", "# ")), play.name
        assert "  \n" not in play.text


def test_clean_play_markdown_keeps_the_play_text():
    md = "# Title\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be:  \n__\\[Aside]_ that is\\--the question.\n"
    assert clean_play_markdown(md) == "Title\n\nACT I\n\nEnter HAMLET\n\nHAMLET:\nTo be, or not to be:\n[Aside] that is--the question.\n"


def test_sources_files_folders_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second document")
    (tmp_path / "rows.jsonl").write_text('{"body": "third"}\n\n{"body": "fourth"}\n')
    assert sorted(read_source(str(tmp_path / "*.txt")).texts) == ["first document"]
    assert len(read_source(str(tmp_path), field="body").documents) == 4
    assert read_source(str(tmp_path / "rows.jsonl"), field="body").texts == ["third", "fourth"]
    with pytest.raises(LlmkitError, match="no field 'text'"):
        read_source(str(tmp_path / "rows.jsonl"))
    with pytest.raises(LlmkitError, match="not a file, folder, glob"):
        read_source(str(tmp_path / "missing.txt"))
    with pytest.raises(LlmkitError, match="matches no file"):
        read_source(str(tmp_path / "*.csv"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LlmkitError, match="is empty"):
        read_source(str(tmp_path / "empty.txt"))
    with pytest.raises(LlmkitError, match="no Shakespeare play"):
        read_source("shakespeare:not-a-play")


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 ok \xff\xfe broken \xc3")
    corpus = read_source(str(tmp_path / "bad.txt"))
    assert corpus.replaced_bytes == 3
    assert corpus.texts == ["café ok \ufffd\ufffd broken \ufffd"]
    assert "3 invalid UTF-8" in corpus.warnings[0]


def test_normalize_and_deduplicate():
    assert normalize("Cafe\u0301\r\nline\rend") == "Café\nline\nend"
    assert normalize("ﬁ", "NFKC") == "fi"
    keep, dropped = drop_exact_duplicates(["a b", "c d", "a b"])
    assert keep == [0, 1] and dropped == 1
    base = " ".join(f"word{i}" for i in range(300))
    near = base.replace("word150", "changed")
    other = " ".join(f"other{i}" for i in range(300))
    keep, dropped = drop_near_duplicates([base, near, other])
    assert keep == [0, 2] and dropped == 1


def test_split_is_by_document_seeded_and_disjoint():
    docs = [f"document {i}" for i in range(40)]
    train, val = split_documents(docs, 0.1, seed=3)
    assert len(val) == 4 and set(train).isdisjoint(val) and sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.1, seed=3) == (train, val)
    assert split_documents(docs, 0.1, seed=4) != (train, val)
    # one big file: cut at blank lines so there is still something to hold out
    train, val = split_documents(["\n\n".join(f"paragraph {i}" for i in range(500))], 0.1, seed=0)
    assert len(val) >= 1 and len(train) > len(val)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizers_by_kind):
    tok_dir = tmp_path_factory.mktemp("tok")
    tokenizers_by_kind["byte-bpe"].save(tok_dir)
    out = tmp_path_factory.mktemp("data")
    meta = prepare("shakespeare", str(tok_dir), str(out), log=lambda m: None)
    return out, meta, tokenizers_by_kind["byte-bpe"]


@pytest.mark.slow
def test_prepare_shakespeare_token_count_equals_direct_encoding(shards):
    out, meta, tok = shards
    texts = [normalize(d.text) for d in shakespeare()]
    train, val = split_documents(texts, 0.1, 1337)
    direct_train = [i for t in train for i in tok.encode(t) + [tok.eos_id]]
    direct_val = [i for t in val for i in tok.encode(t) + [tok.eos_id]]
    data = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert meta["dtype"] == "uint16"
    assert meta["train_tokens"] == len(direct_train) == len(data)
    assert meta["val_tokens"] == len(direct_val)
    assert data.tolist() == direct_train
    assert np.fromfile(out / "val.bin", dtype=np.uint16).tolist() == direct_val
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert meta["train_units"] == 34 and meta["val_units"] == 4
    assert (out / "tokenizer.json").exists() and json.loads((out / "meta.json").read_text()) == meta


@pytest.mark.slow
def test_loader_windows_are_slices_of_the_shard_and_shard_by_rank(shards):
    out, meta, tok = shards
    data = np.fromfile(out / "train.bin", dtype=np.uint16).astype(np.int64)
    loader = WindowLoader(out, "train", window=65, batch_size=4, seed=7, tokenizer=tok)
    batch = loader.batch(3)
    assert batch.shape == (4, 65) and batch.dtype == torch.int64
    text = data.tobytes()
    for row in batch.numpy():
        assert row.tobytes() in text  # every window is a contiguous slice
    assert torch.equal(loader.batch(3), batch) and not torch.equal(loader.batch(4), batch)
    # two ranks with half the rows each see exactly the global batch of one process
    full = WindowLoader(out, "train", window=65, batch_size=8, seed=7).batch(5)
    halves = [WindowLoader(out, "train", window=65, batch_size=4, seed=7, rank=r, world_size=2).batch(5) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), full)
    # sequential windows walk the validation shard in order, split between ranks
    val = np.fromfile(out / "val.bin", dtype=np.uint16).astype(np.int64)
    seq = torch.cat(list(WindowLoader(out, "val", window=128, batch_size=16).sequential()))
    assert seq.shape[0] == len(val) // 128 and torch.equal(seq.flatten(), torch.from_numpy(val[: seq.numel()]))
    r0 = torch.cat(list(WindowLoader(out, "val", window=128, batch_size=16, rank=0, world_size=2).sequential()))
    r1 = torch.cat(list(WindowLoader(out, "val", window=128, batch_size=16, rank=1, world_size=2).sequential()))
    assert torch.equal(r0, seq[0::2]) and torch.equal(r1, seq[1::2])


@pytest.mark.slow
def test_tokenizer_shard_mismatch_and_corruption_are_refused(shards, tokenizers_by_kind, tmp_path):
    out, meta, tok = shards
    with pytest.raises(LlmkitError, match="shards were made with tokenizer"):
        WindowLoader(out, "train", tokenizer=tokenizers_by_kind["bpe"])
    with pytest.raises(LlmkitError, match="fewer than one window"):
        WindowLoader(out, "val", window=10**8)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "val.bin"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "train.bin").write_bytes((out / "train.bin").read_bytes()[:1000])
    with pytest.raises(LlmkitError, match="corrupt"):
        WindowLoader(broken, "train")
    with pytest.raises(LlmkitError, match="not a prepared shard folder"):
        load_meta(tmp_path)
    check_tokenizer(meta, tok)  # the right one passes


def test_prepare_writes_uint32_for_big_vocabularies_and_nothing_on_failure(tmp_path):
    from llmkit.tokenizer import Tokenizer

    (tmp_path / "a.txt").write_text("To be, or not to be.\n\n" * 50)
    (tmp_path / "b.txt").write_text("That is the question.\n\n" * 50)
    meta = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], Tokenizer.load("smollm2"), str(tmp_path / "ok"), log=lambda m: None)
    assert meta["dtype"] == "uint16"  # 49,152 fits
    out = tmp_path / "failed"
    with pytest.raises(LlmkitError):
        prepare(str(tmp_path / "missing.txt"), Tokenizer.load("smollm2"), str(out), log=lambda m: None)
    assert not out.exists()
    from llmkit.data.prepare import shard_dtype

    assert shard_dtype(70_000) == np.uint32 and shard_dtype(65_536) == np.uint16


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    io.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_open(path, "w") as f:
            f.write('{"v": 2')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_data_prepare_warns_when_the_tokenizer_saw_the_validation_documents(tmp_path):
    from llmkit.tokenizer import train_tokenizer

    texts = read_source("shakespeare:macbeth").texts
    tok = train_tokenizer(texts, "byte-bpe", 600)
    tok.info.update(source="shakespeare:macbeth", val_fraction=0.0, seed=1337)
    notes = []
    prepare("shakespeare:macbeth", tok, str(tmp_path / "d"), val_fraction=0.1, seed=1337, log=notes.append)
    assert any("validation documents may have shaped it" in n for n in notes)
    tok.info.update(val_fraction=0.1)
    notes.clear()
    prepare("shakespeare:macbeth", tok, str(tmp_path / "e"), val_fraction=0.1, seed=1337, log=notes.append)
    assert not any("warning" in n for n in notes)


def _token_shard(folder, n_tokens: int):
    """A train shard whose token i is i: a window's first token is where it starts."""
    folder.mkdir(parents=True, exist_ok=True)
    np.arange(n_tokens, dtype=np.uint16).tofile(folder / "train.bin")
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "train_tokens": n_tokens, "val_tokens": 0}))
    return folder


def test_shuffled_windows_take_every_token_once_per_epoch(tmp_path):
    """`sampling="shuffle"`: each epoch the shard cut `stride` apart from its own offset, every window once in its own
    order; with windows one token longer than the stride each token between the epoch's first and last cut is a target
    once. A pure function of (seed, step) as the random sampler: called in any order (a resumed run), split between
    ranks or micro-steps, across an epoch's end too."""
    n_tokens = 1000
    _token_shard(tmp_path, n_tokens)

    def loader(batch_size=4, seed=3, **kw):
        return WindowLoader(tmp_path, window=17, batch_size=batch_size, seed=seed, sampling="shuffle", stride=16, **kw)

    one = loader()
    n = one.windows_per_epoch()
    slack = n_tokens - 17 - (n - 1) * 16  # the last offset that keeps the last window whole
    assert n == 61 and slack == 23
    steps = range(2 * n // 4 + 1)  # a little over two epochs
    rows = torch.cat([one.batch(step) for step in steps])
    backwards = {step: one.batch(step) for step in reversed(steps)}
    assert torch.equal(torch.cat([backwards[step] for step in steps]), rows)
    offsets = []
    for e in (0, 1):
        epoch = rows[e * n : (e + 1) * n]
        offset = int(epoch[:, 0].min())
        assert sorted((epoch[:, 0] - offset).tolist()) == [16 * k for k in range(n)]
        assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 17)) for r in epoch)  # contiguous slices
        assert sorted(epoch[:, 1:].flatten().tolist()) == list(range(offset + 1, offset + 1 + 16 * n))
        offsets.append(offset)
    assert not torch.equal(rows[:n, 0] - offsets[0], rows[n : 2 * n, 0] - offsets[1])  # each epoch its own order
    full = loader(batch_size=8).batch(7)  # global rows 56..63: across the first epoch's end (61)
    assert torch.equal(full, rows[56:64])
    assert torch.equal(torch.cat([loader(rank=r, world_size=2).batch(7) for r in (0, 1)]), full)
    assert torch.equal(torch.cat([loader().batch(7, m, 2) for m in (0, 1)]), full)
    # the offset moves between epochs over all of 0..slack, so the cuts move and the shard's ends get trained on
    whole = loader(batch_size=n)  # one step = one epoch
    epoch_offsets = [int(whole.batch(e)[:, 0].min()) for e in range(60)]
    assert min(epoch_offsets) >= 0 and max(epoch_offsets) <= slack and max(epoch_offsets) >= 16 and len(set(epoch_offsets)) > 10
    assert not torch.equal(loader(seed=4).batch(0), one.batch(0))
    for length in (17, 18, 32, 33, 40):  # shards of one window or a few: every window whole, inside the shard
        tiny = WindowLoader(_token_shard(tmp_path / str(length), length), window=17, batch_size=3, seed=1, sampling="shuffle", stride=16)
        starts = torch.cat([tiny.batch(step) for step in range(20)])[:, 0]
        assert 0 <= int(starts.min()) and int(starts.max()) <= length - 17
    with pytest.raises(LlmkitError, match="sampling"):
        WindowLoader(tmp_path, window=17, sampling="epochs")
    with pytest.raises(LlmkitError, match="stride"):
        WindowLoader(tmp_path, window=17, sampling="shuffle", stride=0)
