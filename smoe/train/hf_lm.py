"""Hugging Face models in the smoe workflow: upcycle one to disk, continue its pre-training, evaluate it.

* :func:`upcycle_pretrained` -- ``smoe upcycle --from smollm2|minilm|HF_DIR``: load the dense model offline
  (:func:`smoe.interop.load_pretrained`), :func:`smoe.upcycle` it in place and ``save_pretrained`` it (with its
  tokenizer) into a new folder.
* :func:`train_hf_lm` -- ``smoe train --resume-from HF_DIR``: continued pre-training of a causal LM (upcycled or
  not) on an smoe text corpus tokenised with the model's own tokenizer: AdamW with warm-up + cosine
  (:mod:`smoe.train.optim`), the MoE layers' auxiliary losses added, gradient clipping, the validation loss at
  every ``eval_every`` and at the end; the model is saved back with ``save_pretrained`` (atomically: a new
  folder replaces the old). The optimizer state is not kept: a second call starts a new schedule from the saved
  weights (unlike smoe runs, which resume exactly).
* :func:`evaluate_hf_lm` -- mean next-token loss on evenly spread windows of a split.
* :func:`sts_spearman` -- an embedding model's Spearman correlation with the Lee human similarity ratings
  (:mod:`smoe.data.sts`), mean-pooled token states as sentence-transformers pools all-MiniLM-L6-v2.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smoe.data import DataConfig, LMData
from smoe.data.build import _load_splits
from smoe.interop.hf_upcycle import load_pretrained
from smoe.interop.upcycle import upcycle, upcycled_aux_loss
from smoe.train.config import TrainConfig
from smoe.train.optim import build_optimizer, build_scheduler

#: windows per evaluation batch (the evaluation of ``eval_batches`` batches reads this many times more windows)
EVAL_BATCH_SIZE = 8

__all__ = [
    "EVAL_BATCH_SIZE",
    "HFTokenizer",
    "hf_lm_data",
    "upcycle_pretrained",
    "evaluate_hf_lm",
    "train_hf_lm",
    "sts_spearman",
]


class HFTokenizer:
    """A ``transformers`` tokenizer behind the interface :class:`smoe.data.LMData` reads (``encode``, ``name``,
    ``vocab_size``): plain token ids, no special tokens added."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.name = f"hf:{type(tokenizer).__name__}"
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> torch.Tensor:
        ids = self._tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def hf_lm_data(tokenizer, data: DataConfig, *, batch_size: int, seq_len: int, seed: int = 0) -> LMData:
    """The text corpus ``data`` names (default Shakespeare) as :class:`~smoe.data.LMData` in the model's tokens."""
    splits = _load_splits("lm", data)
    return LMData(splits, HFTokenizer(tokenizer), batch_size=batch_size, seq_len=seq_len, seed=seed)


def _save_folder(model: nn.Module, tokenizer, out: pathlib.Path, extra: dict[str, dict] | None = None) -> None:
    """``save_pretrained`` into ``out`` atomically: written beside it, then moved in place of it."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name, record in (extra or {}).items():
        (tmp / name).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def upcycle_pretrained(source: str, out: str | os.PathLike, **options) -> dict:
    """Load ``source`` (an offline model name or a local folder), upcycle it with ``options`` (those of
    :func:`smoe.upcycle`) and save it with its tokenizer into the new folder ``out``; returns a summary."""
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{str(out)!r} exists and is not empty; choose another folder")
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(source)
    dense = sum(p.numel() for p in model.parameters())
    up = upcycle(model, **options)
    record = {"source": str(source), "layers": list(up.layers), "settings": up.settings}
    _save_folder(model, tokenizer, out, {"smoe_upcycled.json": record})
    return {
        "out": str(out),
        "from": str(source),
        "layers": list(up.layers),
        "dense_parameters": dense,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def evaluate_hf_lm(model: nn.Module, data: LMData, split: str = "validation", max_batches: int | None = 8) -> dict:
    """Mean next-token cross-entropy (nats) and perplexity of a causal LM on evenly spread windows of ``split``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x_BL, y_BL in data.eval_batches(split, max_batches):
        logits = model(input_ids=x_BL).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y_BL.flatten(), reduction="sum"))
        count += y_BL.numel()
    model.train(was)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "split": split}


def train_hf_lm(
    source: str | os.PathLike,
    out: str | os.PathLike | None,
    train: TrainConfig,
    data: DataConfig,
    *,
    seq_len: int = 128,
    eval_batches: int = 8,
    progress: bool = True,
) -> dict:
    """Continue pre-training the causal LM saved in ``source`` (module docstring); saves into ``out`` (default:
    ``source`` itself) and returns the final validation record with ``history``."""
    from tqdm import tqdm  # noqa: PLC0415

    source = pathlib.Path(source)
    out = pathlib.Path(out) if out is not None else source
    model, tokenizer = load_pretrained(str(source))
    if not hasattr(model, "generate") or tokenizer is None:
        raise ValueError(f"{str(source)!r} is not a causal LM with a tokenizer; smoe trains Hugging Face causal LMs")
    L = data.seq_len or seq_len
    lm = hf_lm_data(tokenizer, data, batch_size=train.batch_size, seq_len=L, seed=train.seed)
    val = copy.copy(lm)  # evaluation in batches of EVAL_BATCH_SIZE windows, as `smoe eval` on the saved folder
    val.batch_size = EVAL_BATCH_SIZE
    torch.manual_seed(train.seed)
    opt = build_optimizer(model, train)
    sched = build_scheduler(opt, train)
    history = [dict(evaluate_hf_lm(model, val, max_batches=eval_batches), step=0)]
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(train.steps), desc="train", disable=not progress, leave=False)
    for step in bar:
        x_BL, y_BL = lm.train_batch(step)
        logits = model(input_ids=x_BL).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y_BL.flatten())
        aux = upcycled_aux_loss(model)
        total = loss if aux is None else loss + aux
        loss_value = float(loss.detach())
        if not bool(torch.isfinite(total.detach())):
            raise ValueError(f"training diverged at step {step + 1}: loss={loss_value}; lower train.lr")
        opt.zero_grad(set_to_none=True)
        total.backward()
        if train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        sched.step()
        rec = {
            "step": step + 1,
            "split": "train",
            "loss": loss_value,
            "aux_loss": 0.0 if aux is None else float(aux.detach()),
        }
        history.append(rec)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if train.eval_every and (step + 1) % train.eval_every == 0 and step + 1 < train.steps:
            history.append(dict(evaluate_hf_lm(model, val, max_batches=eval_batches), step=step + 1))
    bar.close()
    final = dict(evaluate_hf_lm(model, val, max_batches=eval_batches), step=train.steps)
    final["train_time"] = time.perf_counter() - t0
    final["tokens_per_s"] = train.steps * train.batch_size * L / max(final["train_time"], 1e-9)
    history.append(final)
    record = {"final": final, "train": {k: getattr(train, k) for k in ("steps", "batch_size", "lr", "seed")}}
    record["data"] = lm.describe()
    _save_folder(model, tokenizer, out, {"smoe_train.json": record})
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)
    return dict(final, history=history, out=str(out))


@torch.no_grad()
def sts_spearman(model: nn.Module, tokenizer, *, max_length: int = 256, batch_size: int = 16) -> float:
    """Spearman correlation of the cosine similarities of mean-pooled embeddings with the Lee human ratings."""
    from scipy.stats import spearmanr  # noqa: PLC0415

    from smoe.data.sts import load_lee_sts  # noqa: PLC0415

    sts = load_lee_sts()
    model.eval()
    embs = []
    for i in range(0, len(sts.documents), batch_size):
        enc = tokenizer(
            sts.documents[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        h_BLD = model(**enc).last_hidden_state.float()
        m_BL1 = enc["attention_mask"].unsqueeze(-1).to(h_BLD.dtype)
        embs.append((h_BLD * m_BL1).sum(1) / m_BL1.sum(1).clamp_min(1.0))
    e_ND = F.normalize(torch.cat(embs), dim=-1)
    cos = (e_ND[sts.pairs[:, 0]] * e_ND[sts.pairs[:, 1]]).sum(-1).numpy()
    return float(spearmanr(cos, sts.ratings).statistic) if np.isfinite(cos).all() else float("nan")
