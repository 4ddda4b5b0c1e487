"""The one config engine (medfm.config) on every stage's real config: Union arms, Literal,
did-you-mean, key paths with list indices, ${VAR} expansion, and key=value overrides through each
stage's real command line. Nothing here reads data: every error comes before it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from pretrain_helpers import TINY, base_config, write_yaml
from typer.testing import CliRunner

from medfm.cli import app
from medfm.config import ConfigError, apply_override, from_dict, read_tree
from medfm.finetune.config import load_config as load_finetune
from medfm.ingest.ehr.spec import parse_ehr_options
from medfm.ingest.load import load_spec, parse_spec
from medfm.ingest.spec import SpecError
from medfm.models import build_encoder
from medfm.pretrain.config import load_config as load_pretrain
from medfm.synth.audit import load_audit_config

FINETUNE = {
    "name": "t",
    "out_dir": "/tmp/unused",
    "encoder": "unused",
    "data": {"shards": "unused"},
    "task": {"type": "binary", "label_names": ["a", "b"]},
}


def spec(**extra) -> dict:
    return {"sources": [{"name": "a", "root": "/x"}, {"name": "b", "root": "/y"}], **extra}


def pretrain_tree(tmp_path: Path) -> dict:
    model = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
    return base_config(tmp_path, tmp_path / "absent-shards", model, [{"name": "mae"}])


def raises(message: str):
    return pytest.raises(ConfigError, match="^" + re.escape(message))


# ---------------------------------------------------------------- Union arms


def test_every_union_arm_is_tried():
    """eval.threshold is `float | Literal[...]`: the second arm fits where the first fails."""
    base = {**FINETUNE, "eval": {"threshold": "val_youden"}}
    assert load_finetune(None, base=base).eval.threshold == "val_youden"
    assert load_finetune(None, ["eval.threshold=0.3"], base=base).eval.threshold == 0.3
    with raises("eval.threshold: expected float | 'val_youden' | 'val_accuracy', got 'val_youdn'"):
        load_finetune(None, ["eval.threshold=val_youdn"], base=base)
    cfg = load_pretrain(None, ["train.devices=2"], base=pretrain_tree(Path("/tmp")))
    assert cfg.train.devices == 2  # `int | str`: a YAML int stays an int


def test_union_arm_that_takes_the_shape_reports_its_inner_error():
    """`labels_table: LabelsTable | None`: a mapping is a labels table; what is wrong inside it
    is reported at its own path, not as 'fits no arm'."""
    bad = spec()
    bad["sources"][1]["labels_table"] = {"key": "stem"}
    with raises("sources[1].labels_table.path: required key is missing"):
        parse_spec(bad)

    @dataclass
    class Patch:  # no stage has a multi-arm union of structured types yet; the rule is general
        size: int | list[int] = 8

    with raises("size[1]: expected int, got 'x'"):
        from_dict(Patch, {"size": [4, "x"]})
    with raises("size: expected int | list[int], got 'x'"):
        from_dict(Patch, {"size": "x"})


# ---------------------------------------------------------------- Literal and did-you-mean


@pytest.mark.parametrize(
    "load, message",
    [
        (
            lambda: parse_spec(spec(intensity={"ct": "zscroe"})),
            "intensity.ct: expected one of ['raw', 'zscore'], got 'zscroe' "
            "(did you mean 'zscore'?)",
        ),
        (
            lambda: load_finetune(None, ["mode=loar"], base=FINETUNE),
            "mode: expected one of ['linear_probe', 'lora', 'full'], got 'loar' "
            "(did you mean 'lora'?)",
        ),
        (
            lambda: parse_ehr_options({"tables": [], "sample_per": "admision"}, "event_tables"),
            "options.sample_per: expected one of ['patient', 'admission'], got 'admision' "
            "(did you mean 'admission'?)",
        ),
    ],
)
def test_literal_values_are_checked_with_a_guess(load, message):
    with raises(message):
        load()


@pytest.mark.parametrize(
    "load, message",
    [
        (lambda: parse_spec(spec(sigal={})), "sigal: unknown key (did you mean 'signal'?)"),
        (
            lambda: parse_spec(spec(signal={"normalise": "record"})),
            "signal.normalise: unknown key (did you mean 'normalize'?)",
        ),
        (
            lambda: load_pretrain(None, ["train.warmup_stepz=3"], base=pretrain_tree(Path("/t"))),
            "train.warmup_stepz: unknown key (did you mean 'warmup_steps'?)",
        ),
        (
            lambda: load_finetune(None, ["lora.rnak=4"], base=FINETUNE),
            "lora.rnak: unknown key (did you mean 'rank'?)",
        ),
        (
            lambda: load_audit_config(None, ["thresholds.coverage_ratio_mn=0.1"]),
            "thresholds.coverage_ratio_mn: unknown key (did you mean 'coverage_ratio_min'?)",
        ),
        (
            lambda: load_audit_config(None, ["zzz=1"]),
            "zzz: unknown key (allowed: calibration_quantile, closest_pairs, encoder,",
        ),
    ],
)
def test_unknown_keys_get_a_guess_or_the_allowed_list(load, message):
    with raises(message):
        load()


# ---------------------------------------------------------------- paths and overrides


def test_list_indices_in_override_keys_and_messages():
    tree = spec()
    apply_override(tree, "sources[1].format=png")
    apply_override(tree, "sources.0.modality=CT")
    assert [s.format for s in parse_spec(tree).sources] == ["auto", "png"]
    assert parse_spec(tree).sources[0].modality == "CT"
    with raises("sources[1].format: unknown format 'nifit' (did you mean 'nifti'?)"):
        parse_spec(read_tree(None, ["sources[1].format=nifit"], base=spec()))
    with raises("sources[5]: no list item 5 (the list has 2)"):
        read_tree(None, ["sources[5].format=png"], base=spec())
    with raises("split.fractions[1]: expected float, got 'x'"):
        parse_spec(spec(split={"fractions": [0.5, "x"]}))
    with raises("objectives[0].mask_ration: unknown key (did you mean 'mask_ratio'?)"):
        load_pretrain(None, ["objectives[0].mask_ration=0.5"], base=pretrain_tree(Path("/t")))
    with raises("override key 'train..lr'"):
        read_tree(None, ["train..lr=1"])


# ---------------------------------------------------------------- ${VAR}


def test_env_vars_expand_with_defaults_and_unset_ones_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDFM_TEST_ROOT", "/data/ct")
    monkeypatch.delenv("MEDFM_TEST_UNSET", raising=False)
    s = parse_spec({"sources": [{"name": "a", "root": "${MEDFM_TEST_ROOT}/x"}]})
    assert s.sources[0].root == "/data/ct/x"
    s = parse_spec({"sources": [{"name": "a", "root": "${MEDFM_TEST_UNSET:-/d}/x"}]})
    assert s.sources[0].root == "/d/x"
    monkeypatch.setenv("MEDFM_TEST_EMPTY", "")
    s = parse_spec({"sources": [{"name": "a", "root": "${MEDFM_TEST_EMPTY:-/e}/x"}]})
    assert s.sources[0].root == "/e/x"  # `:-` replaces an empty value too, as in the shell
    with raises(
        "sources[1].root: environment variable MEDFM_TEST_UNSET is not set "
        "(write ${MEDFM_TEST_UNSET:-default} for a fallback)"
    ):
        parse_spec(
            {"sources": [spec()["sources"][0], {"name": "b", "root": "${MEDFM_TEST_UNSET}"}]}
        )
    # A value that is not text is read as YAML once expanded; encoder params (untyped in the
    # config) expand when the encoder registry validates them.
    monkeypatch.setenv("MEDFM_TEST_STEPS", "7")
    tree = pretrain_tree(tmp_path)
    tree["train"]["max_steps"] = "${MEDFM_TEST_STEPS}"
    tree["model"]["img_size"] = "${MEDFM_TEST_UNSET:-28}"
    cfg = load_pretrain(None, base=tree)
    assert cfg.train.max_steps == 7 and build_encoder(cfg.model).config.img_size == 28
    monkeypatch.setenv("MEDFM_TEST_ENCODER", "/models/enc")
    assert load_audit_config(None, ["encoder=${MEDFM_TEST_ENCODER}"]).encoder == "/models/enc"
    with raises("thresholds.fd_ratio_max: environment variable MEDFM_TEST_UNSET is not set"):
        load_audit_config(None, {"thresholds.fd_ratio_max": "${MEDFM_TEST_UNSET}"})


def test_spec_errors_stay_spec_errors(tmp_path):
    """Ingest raises SpecError (a ConfigError) from the engine and from file reading alike."""
    with pytest.raises(SpecError):
        parse_spec(spec(shards={"chunks": "64"}))
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "absent.yaml")
    assert issubclass(SpecError, ConfigError)


# ---------------------------------------------------------------- every stage's command line


def run(args: list[str]):
    return CliRunner().invoke(app, args)


def test_ingest_cli_overrides(tmp_path):
    """The spec file's bad intensity.ct is fixed by an override, so the error is about the next
    override: both reached the validator, before Ray starts or any file is read."""
    path = write_yaml(spec(intensity={"ct": "minmax"}), tmp_path / "spec.yaml")
    out = tmp_path / "out"
    res = run(
        ["ingest", str(path), "--out", str(out), "intensity.ct=raw", "sources[1].format=nift"]
    )
    assert res.exit_code == 2, res.output
    assert "sources[1].format: unknown format 'nift' (did you mean 'nifti'?)" in res.output
    res = run(["ingest", str(path), "--out", str(out)])
    assert res.exit_code == 2 and "intensity.ct: expected one of" in res.output
    assert not out.exists()


def test_pretrain_cli_overrides(tmp_path):
    tree = pretrain_tree(tmp_path)
    tree["train"]["max_steps"] = 0
    path = write_yaml(tree, tmp_path / "cfg.yaml")
    res = run(["pretrain", "--config", str(path), "train.max_steps=5", "data.batch_size=0"])
    assert res.exit_code == 2, res.output
    assert "data.batch_size: must be >= 1, got 0" in res.output
    res = run(["pretrain", "--config", str(path), "objectives[0].name=maee"])
    assert res.exit_code == 2
    assert "objectives[0].name: unknown objective 'maee' (did you mean 'mae'?)" in res.output
    assert not (tmp_path / "run").exists()


def test_finetune_cli_overrides(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text(json.dumps({**FINETUNE, "eval": {"ci": 2.0}}))
    res = run(
        ["finetune", "--config", str(path), "--set", "eval.ci=0.9", "--set", "train.epochs=0"]
    )
    assert res.exit_code == 2, res.output
    assert "epochs: must be >= 1" in res.output
    res = run(["finetune", "--config", str(path), "--set", "eval.threshold=val_youdn"])
    assert res.exit_code == 2 and "(did you mean 'val_youden'?)" in res.output


def test_synth_cli_overrides(tmp_path):
    absent = str(tmp_path / "absent")
    res = run(["synth", "audit", "--synthetic", absent, "--real", absent, "--set", "k=many"])
    assert res.exit_code == 2 and "k: expected int, got 'many'" in res.output, res.output
    res = run(["synth", "audit", "--synthetic", absent, "--real", absent, "--set", "k=3"])
    assert res.exit_code == 2 and "no manifest.json" in res.output, res.output  # past the config
    res = run(["synth", "generate", "--model", absent, "--n", "1", "--out", absent, "--set", "k=3"])
    assert res.exit_code == 2 and "use it with --audit" in res.output
