"""`medfm finetune export RUN --out DIR` and `medfm.finetune.load(DIR)`.

An export is small and self-describing: a PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`) or the fully fine-tuned
encoder, the head as safetensors, `medfm.json` (base encoder id and hash, preprocessing contract,
labels, metrics with CIs, data manifest hashes, file hashes) and a Hugging Face model card. It is
written to a temporary folder and renamed into place, so a half-written export never exists.

An export travels (hub, e-mail, another site), so it names no local path: the base encoder and
the data sources are recorded as hub references or as paths relative to the export folder, and
`medfm.json` may only list plain files inside the export. Loading refuses anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from safetensors.torch import load_file

from medfm.config import from_dict
from medfm.io import (
    commit,
    get_fs,
    get_tree,
    is_remote,
    put_tree,
    sha256_file,
    write_json,
    write_text,
)
from medfm.models import build_encoder

from .card import model_card
from .config import RUN_RECORD, TaskConfig
from .data import contract_from_dict
from .encoder import BaseEncoder, load_base_encoder
from .model import FinetuneModel
from .tasks import Task, task_for

EXPORT_FORMAT = "medfm-finetune-export"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODE_FILES = {"lora": ADAPTER_FILES, "full": ("encoder.safetensors",)}
PATH_KEYS = ("uri", "root")  # record fields that hold a path or a reference


class ExportError(ValueError):
    """An export or run folder that cannot be used; the message says why."""


class BaseEncoderMismatchError(ExportError):
    """An adapter applied to a different base encoder than the one it was trained on."""


def recorded_task(record: dict[str, Any], where: str) -> Task:
    """The Task of a run's or export's task record (older records lack `pool`: its default)."""
    return task_for(from_dict(TaskConfig, record, where))


def export(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path | str:
    """Write the export folder of a finished run; returns its path. Either may be an
    object-store URL: a run there is copied to a local temporary folder first, and an export
    there is built locally, then uploaded file by file with medfm.json last (a reader checks
    it first, and it lists every other file's hash); an earlier export there is removed first."""
    with tempfile.TemporaryDirectory(prefix="medfm-export-") as work:
        if is_remote(run_dir):
            fs, root = get_fs(str(run_dir))
            if not fs.isfile(f"{root}/{RUN_RECORD}"):
                raise ExportError(f"{run_dir}: no {RUN_RECORD}; not a finished medfm finetune run")
            get_tree(str(run_dir), Path(work) / "run")
            run_dir = Path(work) / "run"
        if not is_remote(out):
            return export_local(Path(run_dir), Path(out), overwrite, Path(out))
        fs, root = get_fs(str(out))
        if fs.exists(root) and not overwrite:
            raise ExportError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
        built = export_local(Path(run_dir), Path(work) / "export", True, str(out))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        put_tree(built, str(out), last=("medfm.json",))
    return str(out)


def export_local(run_dir: Path, out: Path, overwrite: bool, named: Path | str) -> Path:
    """The export of `run_dir` written to the local folder `out`; `named` is where it will
    be read from (out, or the URL it is uploaded to), what its relative paths start from."""
    if not (run_dir / RUN_RECORD).is_file():
        raise ExportError(f"{run_dir}: no {RUN_RECORD}; not a finished `medfm finetune` run")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    run = json.loads((run_dir / RUN_RECORD).read_text())
    tmp = out.with_name(f"{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ckpt = run_dir / "checkpoint"
    shutil.copy2(ckpt / "head.safetensors", tmp / "head.safetensors")
    if run["mode"] == "lora":
        for name in ADAPTER_FILES:
            shutil.copy2(ckpt / "adapter" / name, tmp / name)
        adapter = json.loads((tmp / ADAPTER_FILES[0]).read_text())
        adapter["base_model_name_or_path"] = portable_uri(run["base_encoder"]["uri"], named)
        write_json(tmp / ADAPTER_FILES[0], adapter, indent=2)
    elif run["mode"] == "full":
        shutil.copy2(ckpt / "encoder.safetensors", tmp / "encoder.safetensors")
    for extra in ("roc.png", "seg_overlays.png", "metrics.json"):
        if (run_dir / extra).is_file():
            shutil.copy2(run_dir / extra, tmp / extra)
    files = {p.name: sha256_file(p)[0] for p in sorted(tmp.iterdir())}
    meta = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "name": run["name"],
        "mode": run["mode"],
        "task": run["task"],
        "label_names": run["task"]["label_names"],
        "base_encoder": portable_paths(run["base_encoder"], named),
        "preprocessing": run["preprocessing"],
        "metrics": run["metrics"],
        # The binary decision threshold the run's accuracy-type metrics used (chosen on val
        # when eval.threshold asked for it), so that users of the export decide the same way.
        "threshold": run["fit"].get("threshold"),
        "data": portable_paths(run["data"], named),
        "files": files,
    }
    write_json(tmp / "medfm.json", meta, indent=1)
    write_text(tmp / "README.md", model_card(meta, recorded_task(run["task"], "run.json: task")))
    commit(get_fs(str(out))[0], str(tmp), str(out))  # replaces an earlier export as a whole
    return out


def portable_uri(uri: str, out: Path | str) -> str:
    """A hub reference or URL as it is; a local path relative to the export folder `out`."""
    if "://" in uri:
        return uri
    if is_remote(out):
        raise ExportError(
            f"{uri}: a local path, which an export on an object store cannot name (no path leads "
            "from a bucket to this disk); fine-tune from a hub:// or object-store copy of it"
        )
    local = Path(uri).expanduser().resolve()
    return Path(os.path.relpath(local, Path(out).expanduser().resolve())).as_posix()


def portable_paths(node: Any, out: Path | str) -> Any:
    """A copy of a run record in which every `uri`/`root` is portable (`portable_uri`)."""
    if isinstance(node, dict):
        return {
            k: portable_uri(v, out)
            if k in PATH_KEYS and isinstance(v, str)
            else portable_paths(v, out)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [portable_paths(v, out) for v in node]
    return node


def read_export(folder: Path) -> dict[str, Any]:
    """medfm.json, checked: every listed file is a plain file inside the export with its hash,
    and the files this mode loads are among them."""
    path = folder / "medfm.json"
    if not path.is_file():
        raise ExportError(f"{folder}: no medfm.json; not a medfm fine-tuning export")
    try:
        meta = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a {EXPORT_FORMAT} record")
    files = meta.get("files")
    if not isinstance(files, dict) or not isinstance(meta.get("base_encoder"), dict):
        raise ExportError(f"{path}: no 'files' table or 'base_encoder' record")
    needed = {"head.safetensors", *MODE_FILES.get(meta.get("mode"), ())} - set(files)
    if needed:
        raise ExportError(f"{path}: does not list {sorted(needed)}, which this export loads")
    for name, digest in files.items():
        got = sha256_file(export_file(folder, name))[0]
        if got != digest:
            raise ExportError(f"{folder / name}: sha256 {got} does not match medfm.json ({digest})")
    return meta


def export_file(folder: Path, name: Any) -> Path:
    """A file medfm.json lists: a plain file directly in the export, never a path or a link
    leading out of it (its content, or its hash in an error, would leak another file)."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if len(parts) != 1 or parts[0] in (".", "..") or "\\" in name or name.startswith("/"):
        raise ExportError(
            f"{folder / 'medfm.json'}: lists {name!r}, which is not a file inside the export; "
            "refused"
        )
    path = folder / name
    if path.is_symlink() or not path.is_file():
        raise ExportError(f"{path}: missing, or a link; an export holds plain files only")
    return path


def recorded_base(folder: Path, uri: Any) -> str:
    """The base encoder medfm.json names: a hub reference, or a path relative to the export."""
    if not isinstance(uri, str) or not uri:
        raise ExportError(f"{folder / 'medfm.json'}: base_encoder.uri is missing")
    if "://" in uri:
        return uri
    if Path(uri).is_absolute() or uri.startswith("~"):
        raise ExportError(
            f"{folder / 'medfm.json'}: base_encoder.uri is an absolute local path, which an "
            "export never records; refused. Pass the encoder explicitly (load(DIR, base=...))"
        )
    return str(folder / uri)


def load(
    folder: str | Path, base: str | BaseEncoder | None = None, device: str = "cpu"
) -> FinetuneModel:
    """The exported model (eval mode) on its base encoder, ready for preprocessed inputs.

    `base` defaults to the encoder recorded in medfm.json (a hub:// reference, or a path relative
    to the export folder). Adapters
    and probe heads refuse a base encoder whose weights hash differs from the recorded one.
    """
    from medfm.finetune import hub

    if not hub.is_hub_uri(folder) and is_remote(folder):
        with tempfile.TemporaryDirectory(prefix="medfm-load-") as local:
            get_tree(str(folder), local)  # checked there file by file, like any export
            return load(local, base, device)
    folder = hub.resolve(folder)
    meta = read_export(folder)
    recorded = meta["base_encoder"]
    mode = meta["mode"]
    if mode == "full":
        arch = recorded["architecture"]
        encoder = build_encoder({"name": arch["name"], **arch["params"]}, where="medfm.json")
        encoder.load_state_dict(load_file(folder / "encoder.safetensors"))
    else:
        if not isinstance(base, BaseEncoder):
            base = load_base_encoder(base or recorded_base(folder, recorded.get("uri")))
        if base.sha256 != recorded["sha256"]:
            raise BaseEncoderMismatchError(
                f"{folder}: this {mode} export was trained on base encoder sha256 "
                f"{recorded['sha256']} ({recorded['uri']}), but the given encoder {base.uri} has "
                f"sha256 {base.sha256}; load it on the encoder it was trained on"
            )
        encoder = base.encoder
        if mode == "lora":
            from peft import PeftModel

            encoder = PeftModel.from_pretrained(encoder, str(folder))
    task = recorded_task(meta["task"], "medfm.json: task")
    head = task.build_head(encoder if mode != "lora" else encoder.get_base_model())
    head.load_state_dict(load_file(folder / "head.safetensors"))
    model = FinetuneModel(encoder, head, task).to(device).eval()
    model.medfm = meta
    model.contract = contract_from_dict(meta["preprocessing"])  # how to prepare inputs
    return model
