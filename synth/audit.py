"""`medfm synth audit`: fidelity, diversity and memorization of a synthetic shard set.

Writes `report.json` (every figure, the calibration, each check with its threshold, the flagged
sample keys) plus `report.png` (samples, similarity histograms) and `closest_pairs.png`. Samples
are compared in the generator's [0, 1] intensity space, read through medfm.shards only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm.config import from_dict, read_tree
from medfm.io import write_json
from medfm.models.diffusion.contract import intensity_of
from medfm.shards import Manifest, ShardSet, open_volume

from .contract import check_compatible, observed_contract, synthetic_contract
from .features import embed_all, feature_space
from .memorization import calibrate, match, pixel_vectors, unit_rows
from .metrics import frechet_distance, mean_msssim, prdc

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "audit.yaml"


class EmptyAuditError(ValueError):
    """There is nothing (or too little) to audit."""


@dataclass
class AuditThresholds:
    """Fidelity thresholds are ratios to the same figure for real held-out samples of the same
    count, measured in the same feature space: raw Fréchet distances and coverages depend on the
    space and on the sample count, so no absolute threshold holds across projects. Calibration
    (docs/synth.md): a held-out real sample scores 1, a copy of train 1-2.3, uniform noise
    110-275 (Fréchet) and 0 (precision, coverage) on PneumoniaMNIST in both spaces."""

    fd_ratio_max: float = 10.0  # Fréchet distance / the held-out reference's
    precision_ratio_min: float = 0.5  # precision / the reference's
    coverage_ratio_min: float = 0.5  # coverage / the reference's
    msssim_excess_max: float = 0.15  # synthetic mean MS-SSIM may exceed real by this much
    flagged_fraction_max: float = 0.05


@dataclass
class AuditConfig:
    encoder: str = ""  # exported medfm encoder for features; "" = fixed random conv features
    max_real: int = 20000  # training samples searched for nearest neighbours (random subset)
    max_synthetic: int = 20000
    heldout_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    calibration_quantile: float = 0.01  # share of new real images the flag would catch
    k: int = 5  # neighbours for precision/recall/density/coverage
    msssim_pairs: int = 500
    closest_pairs: int = 8
    patches_per_volume: int = 32  # 3D: real patches drawn per volume
    seed: int = 0
    thresholds: AuditThresholds = field(default_factory=AuditThresholds)


def load_audit_config(
    path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> AuditConfig:
    """The audit YAML (default: synth/configs/audit.yaml) with `key=value` overrides (or a
    {dotted key: value} mapping), validated by the config engine."""
    return from_dict(AuditConfig, read_tree(path or DEFAULT_CONFIG, overrides))


def subsample(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    if len(rows) <= n:
        return rows
    keep = np.random.default_rng(seed).choice(len(rows), n, replace=False)
    return [rows[i] for i in sorted(keep)]


class ImageReader:
    """Rows -> (N, C, *spatial) tensors in the contract's [0, 1] space."""

    def __init__(self, shards: ShardSet, contract: dict[str, Any], cfg: AuditConfig):
        self.shards, self.contract, self.cfg = shards, contract, cfg
        self.intensity = intensity_of(contract)

    def to_tensor(self, data: np.ndarray) -> torch.Tensor:
        """(H, W), (C, H, W) or (I, J, K) stored values -> channel-first [0, 1] floats."""
        x = self.intensity.forward(data)
        spatial = 2 if self.contract["kind"] == "image2d" else 3
        return torch.from_numpy(np.ascontiguousarray(x[None] if x.ndim == spatial else x))

    def samples(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        out = []
        for row in rows:
            data = self.shards.read_sample(row).data
            if data.ndim == 3 and self.contract["kind"] == "image2d":
                data = np.moveaxis(data, -1, 0)
            out.append(self.to_tensor(data))
        return torch.stack(out)

    def patches(self, rows: list[dict[str, Any]], salt: int) -> torch.Tensor:
        """Random contract-sized patches of real volumes (read chunk by chunk)."""
        size = self.contract["shape"]
        out = []
        for n, row in enumerate(rows):
            vol = open_volume(self.shards.fs, self.shards.path, row).image
            rng = np.random.default_rng((self.cfg.seed, salt, n))
            for _ in range(self.cfg.patches_per_volume):
                start = [
                    int(rng.integers(0, max(1, s - p + 1)))
                    for s, p in zip(vol.shape, size, strict=True)
                ]
                box = tuple(slice(a, a + p) for a, p in zip(start, size, strict=True))
                out.append(self.to_tensor(np.asarray(vol[box])))
        return torch.stack(out)

    def read(self, rows: list[dict[str, Any]], salt: int) -> torch.Tensor:
        """Synthetic volumes are already patch-sized; real ones are cut into patches."""
        if self.contract["kind"] == "volume3d" and rows and not rows[0]["synthetic"]:
            return self.patches(rows, salt)
        return self.samples(rows)


def split_real(rows: list[dict[str, Any]], cfg: AuditConfig, warnings: list[str]):
    """(train rows, held-out rows); carves held-out from train when the set has none."""
    train = [r for r in rows if r["split"] == "train"]
    heldout = [r for r in rows if r["split"] in cfg.heldout_splits]
    if not train:
        raise EmptyAuditError("the real shard set has no train-split samples of this kind")
    if not heldout and train[0]["kind"] == "volume3d":
        warnings.append(
            "no held-out volumes: calibrated on other random patches of the training volumes "
            "(thresholds may be lenient)"
        )
        return train, train
    if len(heldout) < 10 and len(train) >= 20:
        perm = np.random.default_rng(cfg.seed).permutation(len(train))
        cut = max(10, len(train) // 10)
        heldout = [train[i] for i in perm[:cut]]
        train = [train[i] for i in perm[cut:]]
        warnings.append(
            f"no held-out split {cfg.heldout_splits}: calibrated on {cut} train samples set "
            "aside, which the generator may have seen (thresholds may be lenient)"
        )
    return train, heldout


def reference_fidelity(
    f_train: torch.Tensor, f_held: torch.Tensor, n: int, k: int, seed: int, warnings: list[str]
) -> dict[str, float] | None:
    """The fidelity figures of real held-out samples, as many as the synthetic ones (the
    Fréchet distance's bias and coverage both depend on the count): the baseline a synthetic
    set is judged against. None when there are too few held-out samples to measure it."""
    if len(f_held) <= k or len(f_held) < 2:
        warnings.append(f"{len(f_held)} held-out samples: too few for a fidelity reference")
        return None
    if len(f_held) < n:
        warnings.append(
            f"fidelity reference from {len(f_held)} held-out samples for {n} synthetic ones "
            "(its Fréchet distance is biased up: the ratio check is lenient)"
        )
    pick = np.random.default_rng(seed).permutation(len(f_held))[:n]
    held = f_held[torch.from_numpy(np.sort(pick))]
    return {"n": len(held), "frechet_distance": frechet_distance(f_train, held)} | prdc(
        f_train, held, k
    )


def ratio(fidelity: dict[str, Any], ref: dict[str, Any], name: str) -> float | None:
    """Synthetic figure / reference figure; None (judged a failure) without a reference."""
    if name not in ref:
        return None
    return fidelity[name] / max(ref[name], 1e-12)


def check(name: str, value: float | None, *, max: float | None = None, min: float | None = None):
    ok = value is not None
    if ok and max is not None:
        ok = value <= max
    if ok and min is not None:
        ok = value >= min
    judged = max is not None or min is not None
    return {"name": name, "value": value, "max": max, "min": min, "pass": ok or not judged}


def audit(synthetic: str, real: str, out: str, cfg: AuditConfig | None = None) -> dict[str, Any]:
    """Run the audit, write the report files into `out`, return the report."""
    cfg = cfg or load_audit_config()
    t0 = time.perf_counter()
    warnings: list[str] = []
    syn_m = Manifest.open(synthetic)
    if len(syn_m) == 0:
        raise EmptyAuditError(f"{synthetic}: holds no samples; nothing to audit")
    contract = synthetic_contract(syn_m)
    real_m = Manifest.open(real)
    kind_rows = [r for r in real_m.rows() if r["kind"] == contract["kind"] and not r["synthetic"]]
    if not kind_rows:
        raise EmptyAuditError(f"{real}: holds no real {contract['kind']} samples to compare with")
    observed = observed_contract(
        real_m, [r for r in kind_rows if r["split"] == "train"] or kind_rows
    )
    check_compatible(contract, observed, f"{synthetic} vs {real}")
    train_rows, heldout_rows = split_real(kind_rows, cfg, warnings)
    train_rows = subsample(train_rows, cfg.max_real, cfg.seed)
    if len(train_rows) < len([r for r in kind_rows if r["split"] == "train"]):
        warnings.append(f"nearest neighbours searched in a random {cfg.max_real} train samples")
    syn_rows = subsample(list(syn_m.rows()), cfg.max_synthetic, cfg.seed)

    real_reader = ImageReader(ShardSet(real), contract, cfg)
    x_syn = ImageReader(ShardSet(synthetic), contract, cfg).read(syn_rows, 0)
    x_train = real_reader.read(train_rows, 1)
    x_held = real_reader.read(heldout_rows, 2) if heldout_rows else x_train[:0]
    if len(x_syn) < 2:
        raise EmptyAuditError(f"{synthetic}: {len(x_syn)} sample; the audit needs at least 2")

    space = feature_space(cfg.encoder, x_syn.shape[1], x_syn.ndim - 2)
    f_syn, f_train, f_held = (embed_all(space, x) for x in (x_syn, x_train, x_held))
    fidelity = {"feature_space": space.name, "frechet_distance": frechet_distance(f_train, f_syn)}
    k = min(cfg.k, len(f_syn) - 1, len(f_train) - 1)
    fidelity |= prdc(f_train, f_syn, k) | {"k": k}
    fidelity["reference"] = reference_fidelity(f_train, f_held, len(f_syn), k, cfg.seed, warnings)
    diversity = {
        "msssim_synthetic": mean_msssim(x_syn, cfg.msssim_pairs, cfg.seed),
        "msssim_real": mean_msssim(x_train, cfg.msssim_pairs, cfg.seed),
    }
    diversity["msssim_excess"] = diversity["msssim_synthetic"] - diversity["msssim_real"]

    # Embeddings are centred on the training mean: raw ReLU features all point one way.
    mu = f_train.mean(0)
    p_train, e_train = pixel_vectors(x_train), unit_rows(f_train - mu)
    cal, held_sims = calibrate(
        pixel_vectors(x_held), unit_rows(f_held - mu), p_train, e_train, cfg.calibration_quantile
    )
    m = match(pixel_vectors(x_syn), unit_rows(f_syn - mu), p_train, e_train)
    flagged = m.flagged(cal)
    t = cfg.thresholds
    ref = fidelity["reference"] or {}
    checks = [
        check("frechet_ratio", ratio(fidelity, ref, "frechet_distance"), max=t.fd_ratio_max),
        check("precision_ratio", ratio(fidelity, ref, "precision"), min=t.precision_ratio_min),
        check("coverage_ratio", ratio(fidelity, ref, "coverage"), min=t.coverage_ratio_min),
        check("msssim_excess", diversity["msssim_excess"], max=t.msssim_excess_max),
        check("flagged_fraction", float(flagged.mean()), max=t.flagged_fraction_max),
    ]
    report = {
        "synthetic": synthetic,
        "real": real,
        "generator": contract_generator(syn_m),
        # Binds the verdict to these rows: the training gate (medfm.shards.check_synthetic)
        # ignores a report of rows that have changed since.
        "synthetic_manifest_sha256": syn_m.header["manifest"]["sha256"],
        "counts": {
            "synthetic": len(x_syn),
            "real_train": len(x_train),
            "real_heldout": len(x_held),
        },
        "fidelity": fidelity,
        "diversity": diversity,
        "memorization": {
            "calibration": cal.to_dict(),
            "flagged": int(flagged.sum()),
            "flagged_fraction": float(flagged.mean()),
            "flagged_keys": [syn_rows[i]["key"] for i in np.flatnonzero(flagged)],
            "max_pixel_similarity": float(m.pixel_similarity.max()),
            "max_embedding_similarity": float(m.embedding_similarity.max()),
        },
        "checks": checks,
        "verdict": "pass" if all(c["pass"] for c in checks) else "fail",
        "warnings": warnings,
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_report(report, out, x_syn, x_train, m, held_sims, cal)
    return report


def contract_generator(m: Manifest) -> str:
    return m.header["attributes"]["synthetic"].get("generator_sha256", "")


def write_report(report, out: str, x_syn, x_train, m, held_sims, cal) -> None:
    """The report files, through medfm.io: `out` may be a local folder or an fsspec URL."""
    from .report import closest_pairs_png, report_png

    out = str(out).rstrip("/")
    write_json(f"{out}/report.json", report, indent=1, default=float)
    report_png(f"{out}/report.png", report, x_syn, x_train, m, held_sims, cal)
    closest_pairs_png(
        f"{out}/closest_pairs.png", x_syn, x_train, m, report["config"]["closest_pairs"]
    )
