"""The ``smoe`` command: smoke tests of every subcommand on debug presets, one-line errors with exit status 2, and
the frozen flag set."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch

from smoe.cli.main import build_parser, main
from smoe.data import get_dataset
from smoe.data import registry as data_registry

TINY_LM = ["--preset", "lm_debug", "--dataset", "pydoc", "--seq-len", "16", "--batch-size", "4", "--no-progress"]

FROZEN_FLAGS = {
    "study": [
        "--batch-size",
        "--bf16",
        "--data",
        "--dataset",
        "--device",
        "--help",
        "--lr",
        "--no-measures",
        "--no-progress",
        "--out",
        "--preset",
        "--quick",
        "--resume",
        "--routers",
        "--seed",
        "--seeds",
        "--seq-len",
        "--set",
        "--steps",
        "--task",
        "--threads",
        "--tokenizer",
        "-h",
    ],
    "train": [
        "--batch-size",
        "--bf16",
        "--ckpt-every",
        "--data",
        "--dataset",
        "--device",
        "--dist-timeout",
        "--eval-every",
        "--expert-parallel",
        "--help",
        "--init-from",
        "--lr",
        "--no-progress",
        "--nproc",
        "--out",
        "--preset",
        "--resume",
        "--resume-from",
        "--seed",
        "--seq-len",
        "--set",
        "--steps",
        "--threads",
        "--tokenizer",
        "--use-intact",
        "-h",
    ],
    "upcycle": [
        "--allow-token-coupling",
        "--capacity-factor",
        "--experts",
        "--from",
        "--group-mode",
        "--help",
        "--json",
        "--layers",
        "--noise",
        "--normalize-weights",
        "--optimizer",
        "--out",
        "--router",
        "--router-option",
        "--seed",
        "--top-k",
        "--use-intact",
        "-h",
    ],
    "eval": [
        "--batches",
        "--data-set",
        "--device",
        "--help",
        "--json",
        "--seq-len",
        "--split",
        "--threads",
        "--use-intact",
        "-h",
    ],
    "analyze": [
        "--baseline",
        "--capacities",
        "--contamination",
        "--corruptions",
        "--device",
        "--help",
        "--no-fluctuation",
        "--out",
        "--probe",
        "--robust",
        "--seed",
        "--severities",
        "--threads",
        "--tsne",
        "-h",
    ],
    "generate": [
        "--device",
        "--help",
        "--prompt",
        "--seed",
        "--temperature",
        "--threads",
        "--tokens",
        "--top-k",
        "-h",
    ],
    "bench": [
        "--backend",
        "--device",
        "--dim",
        "--experts",
        "--forward-only",
        "--help",
        "--hidden",
        "--repeats",
        "--router",
        "--seed",
        "--threads",
        "--tokens",
        "--top-k",
        "--warmup",
        "-h",
    ],
    "ls": [
        "--help",
        "-h",
    ],
}


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_the_command_line_options_are_frozen():
    """Changing a flag is a user-visible change: update this list (and the docs) deliberately."""
    flags = {name: sorted(o for a in sp._actions for o in a.option_strings) for name, sp in _subparsers().items()}
    assert flags == FROZEN_FLAGS


def test_every_subcommand_has_worked_examples(capsys):
    for name, sp in _subparsers().items():
        assert sp.epilog and "examples:" in sp.epilog and f"smoe {name}" in sp.epilog, name
    assert main(["--help"]) == 0 and "smoe study --quick" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0 and "--resume" in capsys.readouterr().out


def test_ls_lists_routers_presets_and_datasets(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "routers:",
        "token_choice",
        "expert_choice",
        "experts:",
        "swiglu",
        "dispatcher local",
        "presets:",
        "lm_debug",
        "vit_small",
        "datasets:",
        "pydoc",
        "installed",
    ):
        assert expected in out
    assert main(["ls", "datasets"]) == 0 and "routers:" not in capsys.readouterr().out


def test_ls_shows_how_to_install_missing_data(capsys, monkeypatch):
    spec = get_dataset("quickdraw")
    fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    monkeypatch.setitem(data_registry._DATASETS, "quickdraw", type(spec)(**{**fields, "is_available": lambda: False}))
    assert main(["ls", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "MISSING" in out and "npm install" in out


def test_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_LM, "--steps", "3", "--set", "moe.top_k=1", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "final validation" in out and "bpb=" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["moe"]["top_k"] == 1 and config["train"]["steps"] == 3
    assert config["data"]["dataset"] == "pydoc" and config["data_info"]["tokenizer"] == "byte"
    assert (run / "checkpoints" / "step-00000003" / "model.safetensors").is_file()

    assert main(["eval", str(run), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["step"] == 3 and result["bpb"] > 0
    assert main(["eval", str(run / "checkpoints" / "step-00000003")]) == 0
    assert "moe layer 0" in capsys.readouterr().out
    # an existing run is never overwritten by a new one
    assert main(["train", *TINY_LM, "--steps", "3", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_train_with_a_local_text_file_and_bpe(tmp_path, capsys):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(topics[k] for k in sorted(topics)[:20]), encoding="utf-8")
    args = [
        "train",
        "--preset",
        "lm_debug",
        "--data",
        str(corpus),
        "--tokenizer",
        "bpe",
        "--set",
        "data.bpe_vocab_size=300",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model"]["vocab_size"] == 300 and config["data_info"]["tokenizer"] == "bpe"
    assert json.loads((tmp_path / "r" / "tokenizer.json").read_text())["kind"] == "bpe"
    assert main(["eval", str(tmp_path / "r")]) == 0


def test_bench_runs_and_times_the_baselines(capsys):
    assert (
        main(
            [
                "bench",
                "--tokens",
                "64",
                "--dim",
                "16",
                "--hidden",
                "32",
                "--experts",
                "4",
                "--repeats",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "smoe.MoE token_choice E=4 k=2" in out and "dense MLP F=64 (same active FLOPs)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--steps", "0"], "--steps: '0' is not a positive integer"),
        (["train", "--steps", "many"], "'many' is not a positive integer"),
        (["nope"], "invalid choice: 'nope'"),
        (["train", "--preset", "lm_huge", "--steps", "1"], "unknown preset 'lm_huge'"),
        (["train", *TINY_LM, "--set", "moe.router=nope", "--steps", "1"], "unknown router 'nope'"),
        (["train", *TINY_LM, "--set", "moe.nope=1"], "unknown config key 'moe.nope'"),
        (["train", *TINY_LM, "--set", "train.nope=1"], "unknown config key 'train.nope'"),
        (["train", *TINY_LM, "--set", "moe.top_k"], "--set expects KEY=VALUE"),
        (["train", *TINY_LM, "--set", "moe.top_k=lots"], "moe.top_k"),
        (["train", "--preset", "lm_debug", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--preset", "lm_debug", "--data", "/no/such/corpus.txt"], "does not exist"),
        (["train", "--resume"], "--resume needs --out"),
        (["study", "--routers", "token_choice,teleport", "--quick"], "unknown router 'teleport'"),
        (["study", "--task", "vision", "--routers", "hash", "--quick"], "applies to --task lm only"),
        (["study", "--task", "audio"], "invalid choice: 'audio'"),
        (["eval", "/no/such/run"], "no checkpoint found"),
        (["ls", "widgets"], "invalid choice: 'widgets'"),
        (["bench", "--top-k", "9", "--experts", "4"], "--top-k (9) must be <= --experts (4)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not into the repository
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_data_names_the_install_command(monkeypatch, capsys, tmp_path):
    spec = get_dataset("pydoc")
    fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    monkeypatch.setitem(data_registry._DATASETS, "pydoc", type(spec)(**{**fields, "is_available": lambda: False}))
    assert main(["train", *TINY_LM, "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "dataset 'pydoc' is not installed" in err and "install it with" in err and len(err.splitlines()) == 1


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_eval_refuses_pickles_and_corrupt_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_LM, "--steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    marker = tmp_path / "code-ran"
    evil = run / "weights.pt"
    torch.save({"state": _Evil(str(marker))}, evil)  # a classic malicious "checkpoint"
    assert main(["eval", str(evil)]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err
    ckpt = run / "checkpoints" / "step-00000001"
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(_Evil(str(marker))))
    assert main(["eval", str(run)]) == 2
    assert "refusing to load it" in capsys.readouterr().err
    assert not marker.exists()
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["eval", str(ckpt)]) == 2
    (ckpt / "state.json").write_text("{")
    assert main(["eval", str(run)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
