"""The demo's ECG and EHR downstream tasks: labels computed from what ingest stored, features
from a frozen pretrained encoder, a logistic-regression probe, and a clustered bootstrap CI.

Neither task is a row label the finetune stage could read (one is per beat inside a window, the
other per discharge inside a patient's record), so the probe here is a plain L2-regularised
logistic regression on the frozen features, scored with finetune's bootstrap and ROC plot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm.models.contract import Contract
from medfm.models.ehr import PAD_ID
from medfm.shards import ShardSet
from medfm.shards.schema import EHR_AGE, EHR_TIME

NORMAL_BEATS = {"N"}  # MIT-BIH "normal beat"; every other beat symbol is non-normal
READMIT_HOURS = 30 * 24
ECG_GAP_S = 30.0  # windows this close to the train/test cut in time are left out of both
ECG_TEST_FRACTION = 0.4  # the last 40% of the record (by window start) is the test period


@dataclass
class ProbeSet:
    """Frozen features of one task's examples with their labels, split and bootstrap cluster."""

    features: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,) 0/1
    train: np.ndarray  # (N,) bool; the rest is the test set
    clusters: list[str]  # resampled together by the bootstrap (a window, a patient)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> torch.nn.Linear:
    """Class-balanced, L2-regularised logistic regression by L-BFGS on standardised features
    (the scaling is folded into the returned layer)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    lin = torch.nn.Linear(x.shape[1], 1, dtype=torch.float64)
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - pos) / max(pos, 1.0), dtype=torch.float64)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(
                lin(z).squeeze(1), y, pos_weight=pos_weight
            )
            + l2 * lin.weight.pow(2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # w.(x - mean)/std + b  ==  (w/std).x + (b - w.mean/std)
        w = lin.weight / std
        lin.bias -= (w * mean).sum()
        lin.weight.copy_(w)
    return lin


def evaluate(ps: ProbeSet, roc: Path, n_boot: int) -> dict[str, Any]:
    """Fit on the train examples, score the test ones: AUROC with a 95% bootstrap CI that
    resamples clusters, the ROC PNG, and the counts behind them."""
    import torchmetrics.functional.classification as tmc

    from medfm.finetune.metrics import bootstrap, plot_roc

    x, y = ps.features.double(), ps.labels.double()
    test = ~ps.train
    with torch.no_grad():
        p = torch.sigmoid(fit_logistic(x[ps.train], y[ps.train])(x[test]).squeeze(1)).float()
    yt = ps.labels[test].long()
    clusters = [c for c, t in zip(ps.clusters, test, strict=True) if t]
    fns = {"auroc": tmc.binary_auroc, "balanced_accuracy": _balanced_accuracy}
    m = bootstrap(fns, p, yt, clusters, n_boot, 0.95)
    plot_roc([("test", p, yt)], roc, m)
    m["counts"] = {
        "train": int(ps.train.sum()), "train_positive": int(ps.labels[ps.train].sum()),
        "test": int(test.sum()), "test_positive": int(yt.sum()),
        "test_clusters": len(set(clusters)),
    }  # fmt: skip
    return m


def _balanced_accuracy(p: torch.Tensor, y: torch.Tensor) -> float:
    """At probability 0.5: the probe is class-balanced, so that is its natural threshold."""
    pred = p >= 0.5
    return float(
        ((pred & (y == 1)).sum() / (y == 1).sum() + (~pred & (y == 0)).sum() / (y == 0).sum()) / 2
    )


# ---------------------------------------------------------------- ECG: beats of MIT-BIH


def ecg_beats(shards: Path, encoder: torch.nn.Module, pre: dict[str, Any]) -> ProbeSet:
    """One example per annotated beat of the MIT-BIH windows (labels.beats with their sample
    positions in extras.beat_idx): normal (N) vs any other beat. Its feature is the frozen
    encoder's tokens around the beat (the patch holding it, two before, one after; leads
    averaged). Split in time, not at random: windows starting in the last 40% of the record
    are the test set, and those within 30 s of the cut belong to neither."""
    ss = ShardSet(str(shards))
    rows = [r for r in ss.rows() if r["dataset"] == "mitdb"]
    contract = Contract(
        kind="signal", intensity=pre["intensity"], signal_length=pre["signal_length"]
    )
    steps, patch = encoder.steps, encoder.patch_dim
    feats, labels, starts, clusters = [], [], [], []
    for r in rows:
        s = ss.read_sample(r)
        symbols, idx = s.labels.get("beats", []), np.asarray(s.extras.get("beat_idx", []))
        if not len(symbols):
            continue
        x = contract.signal(torch.from_numpy(np.asarray(s.data)))[None]
        with torch.no_grad():
            tokens = encoder(x)[0, 1:].reshape(-1, steps, encoder.embed_dim).mean(0)  # (steps, D)
        for sym, b in zip(symbols, idx, strict=True):
            at = np.clip(int(b) // patch + np.arange(-2, 2), 0, steps - 1)
            feats.append(tokens[at].reshape(-1))
            labels.append(float(sym not in NORMAL_BEATS))
            starts.append(float(s.meta["window_start_s"]))
            clusters.append(r["key"])
    start = np.asarray(starts)
    cut = np.quantile(np.unique(start), 1 - ECG_TEST_FRACTION)
    keep = np.abs(start - cut) >= ECG_GAP_S
    return ProbeSet(
        torch.stack(feats)[keep], torch.tensor(labels)[keep], (start < cut)[keep],
        [c for c, k in zip(clusters, keep, strict=True) if k],
    )  # fmt: skip


# ---------------------------------------------------------------- EHR: 30-day readmission


def ehr_discharges(shards: Path, encoder: torch.nn.Module) -> tuple[ProbeSet, dict[str, int]]:
    """One example per discharge alive (a DISCHARGE// token other than DIED) in each patient's
    record; label 1 when an ADMISSION// token follows within 30 days. The feature is the mean of
    the frozen encoder's outputs over the last max_tokens tokens up to that discharge, so
    nothing after it is seen. Patient-level split: the ingest's train patients train the probe,
    its val and test patients (never seen in pretraining either) are the test set."""
    ss = ShardSet(str(shards))
    vocab = json.loads((shards / "ehr" / "mimic" / "vocab.json").read_text())["tokens"]
    admit = np.flatnonzero([t.startswith("ADMISSION//") for t in vocab])
    leave = np.flatnonzero([t.startswith("DISCHARGE//") and t != "DISCHARGE//DIED" for t in vocab])
    n = encoder.config.max_tokens
    feats, labels, train, patients = [], [], [], []
    for r in ss.rows():
        s = ss.read_sample(r)
        codes, times = np.asarray(s.data), np.asarray(s.extras[EHR_TIME])
        admitted = times[np.isin(codes, admit)]
        for at in np.flatnonzero(np.isin(codes, leave)):
            end = int(np.searchsorted(times, times[at], side="right"))  # ties: same instant
            a = max(0, end - n)
            batch = {
                "times": torch.from_numpy(times[a:end].astype(np.float32))[None],
                "age": torch.from_numpy(np.asarray(s.extras[EHR_AGE][a:end], np.float32))[None],
            }
            x = torch.from_numpy(codes[a:end].astype(np.int64))[None]
            with torch.no_grad():
                h = encoder.encode(encoder.tokenize(x, batch), x == PAD_ID)[0, 1:]
            later = admitted[admitted > times[at]]
            feats.append(h.mean(0))
            labels.append(float(len(later) > 0 and later.min() - times[at] <= READMIT_HOURS))
            train.append(r["split"] == "train")
            patients.append(r["patient_id"])
    ps = ProbeSet(torch.stack(feats), torch.tensor(labels), np.asarray(train), patients)
    return ps, {"patients": len(set(patients)), "discharges": len(labels)}
