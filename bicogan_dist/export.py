"""Training checkpoint → a small, self-describing export; and loading it back.

    python tools/convert_checkpoint.py RUN_OR_CHECKPOINT --out EXPORT_DIR [--onnx] [--force]

RUN_OR_CHECKPOINT is a run folder (its newest complete checkpoint is used) or one
``checkpoint-XXXXXXXX`` folder. The export folder holds only safetensors, JSON and ONNX,
so using a model never unpickles anything::

    generator.safetensors   G with the EMA weights (what sampling should use)
    encoder.safetensors     E (bigan / bicogan only)
    export.json             format, version, ModelConfig, architecture, class names, z dim,
                            pixel range and how to turn pixels into uint8, source checkpoint
    generator.onnx          with --onnx: inputs z float32 (B, z_dim) and, for conditional
                            kinds, c int64 (B,); output x float32 (B, 1, 48, 48) in [-1, 1]

Why a separate format: checkpoints hold optimizer state, RNG and the discriminator, are
written per engine (Accelerate/DDP or DeepSpeed ZeRO shards) and need the run's config;
users of a trained model want G and E, the class names and nothing to unpickle.

The export is written into a temporary sibling folder, loaded back and checked against the
in-memory modules, and only then moved into place: a failure leaves nothing half-written.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from bicogan_dist.atomic_dir import atomic_output
from bicogan_dist.config import ConfigError, from_dict, to_dict
from bicogan_dist.train import checkpoint as ckpt

EXPORT_FORMAT = "bicogan_dist.export"
EXPORT_VERSION = 1
GENERATOR_FILE = "generator.safetensors"
ENCODER_FILE = "encoder.safetensors"
META_FILE = "export.json"
ONNX_FILE = "generator.onnx"
ONNX_OPSET = 17
IMAGE_SIZE = 48
CHANNELS = 1
#: Files an export folder may hold; anything else means the folder is not (only) an export.
EXPORT_FILES = (GENERATOR_FILE, ENCODER_FILE, META_FILE, ONNX_FILE)


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported or an export that cannot be loaded; the message names the file."""


# ------------------------------------------------------------------------------ checkpoint side


def find_checkpoint(source: str | Path) -> Path:
    """A run folder → its newest complete checkpoint; a checkpoint folder → itself."""
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{path} does not exist; give a run folder (runs/<name>) or a checkpoint folder "
                          f"(runs/<name>/checkpoints/checkpoint-XXXXXXXX)")
    if not path.is_dir():
        raise ExportError(f"{path} is a file; give a run folder or a checkpoint folder")
    if (path / ckpt.STATE_FILE).is_file():
        return path  # one checkpoint folder: reading its weights names any missing file
    found = ckpt.resolve_checkpoint("latest", path, for_resume=False)
    if found is None:
        incomplete = sorted(ckpt.checkpoint_root(path).glob("checkpoint-*")) if ckpt.checkpoint_root(path).is_dir() \
            else []
        hint = (f" ({len(incomplete)} incomplete checkpoint folder(s) without {ckpt.STATE_FILE}: "
                f"interrupted writes)" if incomplete else "")
        raise ExportError(f"{path}: not a checkpoint folder (no {ckpt.STATE_FILE}) nor a run folder with complete "
                          f"checkpoints under checkpoints/{hint}")
    return found


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return ckpt.read_tensors(path)
    except ckpt.CheckpointError as exc:
        raise ExportError(str(exc)) from exc


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load whose failure names the file and the first mismatching keys or shapes."""
    try:
        ckpt.load_module(module, state, where)
    except ckpt.CheckpointError as exc:
        raise ExportError(str(exc)) from exc


def _model_config(data: Any, where: str):
    from bicogan_dist.models.networks import ModelConfig, with_fields_added_later

    if not isinstance(data, dict):
        raise ExportError(f"{where}: no 'model' section (the ModelConfig of the run)")
    data = with_fields_added_later(data)  # a section older than an option describes the networks it built
    try:
        return from_dict(ModelConfig, data)
    except ConfigError as exc:
        raise ExportError(f"{where}: its model section is not valid here: {exc}") from exc


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------- export side


@dataclass
class ExportedModel:
    """A loaded export: modules in eval mode with gradients off, plus what is needed to use them."""

    G: nn.Module
    E: nn.Module | None
    class_names: list[str]
    model: Any  # bicogan_dist.models.networks.ModelConfig
    z_dim: int
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def conditional(self) -> bool:
        return bool(self.model.conditional)

    @property
    def bidirectional(self) -> bool:
        return bool(self.model.bidirectional)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return next(self.G.parameters()).device


def _frozen(module: nn.Module, device: str | torch.device) -> nn.Module:
    return module.to(device).eval().requires_grad_(False)


def read_export_metadata(export_dir: str | Path) -> dict[str, Any]:
    """``export.json``, checked for format and version (errors name the file)."""
    meta_path = Path(export_dir) / META_FILE
    if not Path(export_dir).is_dir():
        raise ExportError(f"{export_dir} is not a folder; make an export with tools/convert_checkpoint.py")
    if not meta_path.is_file():
        raise ExportError(f"{meta_path} is missing: {export_dir} is not a bicogan_dist export "
                          f"(make one with tools/convert_checkpoint.py)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{meta_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{meta_path}: format is {found!r}, expected {EXPORT_FORMAT!r}")
    if meta.get("version") != EXPORT_VERSION:
        raise ExportError(f"{meta_path}: export version {meta.get('version')!r} is not supported by this "
                          f"bicogan_dist (it reads version {EXPORT_VERSION})")
    for key in ("model", "class_names", "z_dim"):
        if key not in meta:
            raise ExportError(f"{meta_path}: no {key!r} entry")
    return meta


def load_export(export_dir: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild G (and E) from an export folder; reads only JSON and safetensors."""
    from bicogan_dist.models.networks import build_models

    export_dir = Path(export_dir)
    meta = read_export_metadata(export_dir)
    meta_path = export_dir / META_FILE
    cfg = _model_config(meta["model"], str(meta_path))
    class_names = [str(n) for n in meta["class_names"]]
    if int(meta["z_dim"]) != cfg.z_dim:
        raise ExportError(f"{meta_path}: z_dim {meta['z_dim']} differs from model.z_dim {cfg.z_dim}")
    models = build_models(cfg, len(class_names))
    G = models.G
    _load_into(G, _read_safetensors(export_dir / GENERATOR_FILE), str(export_dir / GENERATOR_FILE))
    E = None
    if cfg.bidirectional:
        E = models.E
        _load_into(E, _read_safetensors(export_dir / ENCODER_FILE), str(export_dir / ENCODER_FILE))
    return ExportedModel(G=_frozen(G, device), E=None if E is None else _frozen(E, device), class_names=class_names,
                         model=cfg, z_dim=cfg.z_dim, metadata=meta, path=export_dir)


class _OnnxGenerator(nn.Module):
    """G with a fixed call signature for tracing: (z, c) for conditional kinds, (z,) otherwise."""

    def __init__(self, G: nn.Module, conditional: bool) -> None:
        super().__init__()
        self.G = G
        self.conditional = conditional

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.G(z, c if self.conditional else None)


def write_onnx(G: nn.Module, z_dim: int, conditional: bool, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Trace G (eval mode, CPU) into one ONNX file with a dynamic batch axis.

    Uses the TorchScript-based exporter: the torch.export-based default needs onnxscript,
    which is not among this project's dependencies, and G has no control flow to capture.
    """
    path = Path(path)
    wrapper = _OnnxGenerator(G, conditional).eval()
    z = torch.randn(2, z_dim)
    args: tuple = (z, torch.zeros(2, dtype=torch.long)) if conditional else (z,)
    names = ["z", "c"] if conditional else ["z"]
    axes = {n: {0: "batch"} for n in names}
    axes["x"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice and tracer warnings
        torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names, output_names=["x"],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    return path


def _check_onnx(path: Path, G: nn.Module, z_dim: int, conditional: bool, num_classes: int) -> float | None:
    """Max |onnxruntime − torch| on a small batch, or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, z_dim, generator=gen)
    feeds = {"z": z.numpy()}
    c = None
    if conditional:
        c = torch.arange(3) % num_classes
        feeds["c"] = c.numpy()
    with torch.inference_mode():
        ref = G(z, c).numpy()
    out = sess.run(None, feeds)[0]
    return float(abs(out - ref).max())


def _owned(entry: Path) -> bool:
    """What an export folder holds; anything else means the folder is not (only) an export."""
    return entry.name in EXPORT_FILES


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_checkpoint(source: str | Path, out: str | Path, onnx: bool = False, force: bool = False,
                      opset: int = ONNX_OPSET) -> Path:
    """Convert the checkpoint ``source`` (run or checkpoint folder) into the export folder ``out``."""
    out = Path(out)
    with atomic_output(out, force=force, what="an export", owned=_owned, error=ExportError) as tmp:
        _write_export(find_checkpoint(source), tmp, onnx, opset)
    return out


def _write_export(folder: Path, tmp: Path, onnx: bool, opset: int) -> None:
    """The checkpoint ``folder``'s export into the empty folder ``tmp``, verified by loading it back."""
    from bicogan_dist.models.networks import build_models, describe

    state_path = folder / ckpt.STATE_FILE
    try:
        state = ckpt.read_state(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{state_path}: not valid JSON ({exc})") from exc
    cfg = _model_config(state.get("model"), str(state_path))
    class_names = state.get("label_names")
    if not isinstance(class_names, list) or not class_names:
        raise ExportError(f"{state_path}: no 'label_names' (the class names the model was trained with)")
    num_classes = len(class_names)
    weights = ckpt.weights(folder)

    models = build_models(cfg, num_classes)
    G = models.G
    _load_into(G, weights["ema"], str(folder / ckpt.EMA_FILE))
    G.eval().requires_grad_(False)
    E = None
    if cfg.bidirectional:
        E = models.E
        e_state = _sub_state(weights["ge"], "E.")
        if not e_state:
            raise ExportError(f"{folder}: the {cfg.kind} checkpoint holds no encoder weights (E.*) in its G/E unit")
        _load_into(E, e_state, f"{folder} (E.* of the G/E weights)")
        E.eval().requires_grad_(False)

    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": to_dict(cfg),
        "architecture": _jsonable(describe(cfg, num_classes)),
        "num_classes": num_classes,
        "class_names": [str(n) for n in class_names],
        "z_dim": cfg.z_dim,
        "image_size": IMAGE_SIZE,
        "channels": CHANNELS,
        "pixel_range": [-1, 1],
        "pixel_to_uint8": "round((x + 1) * 127.5)",
        "files": {"generator": GENERATOR_FILE, **({"encoder": ENCODER_FILE} if E is not None else {})},
        "source": {"checkpoint": str(folder.resolve()), "step": state.get("step"), "engine": state.get("engine", "ddp"),
                   "epoch": state.get("epoch"), "world_size": state.get("world_size")},
    }
    st_meta = {"format": EXPORT_FORMAT, "version": str(EXPORT_VERSION)}
    save_file(_contiguous(G.state_dict()), str(tmp / GENERATOR_FILE), metadata={**st_meta, "part": "generator"})
    if E is not None:
        save_file(_contiguous(E.state_dict()), str(tmp / ENCODER_FILE), metadata={**st_meta, "part": "encoder"})
    if onnx:
        write_onnx(G, cfg.z_dim, cfg.conditional, tmp / ONNX_FILE, opset)
        err = _check_onnx(tmp / ONNX_FILE, G, cfg.z_dim, cfg.conditional, num_classes)
        if err is not None and err > 1e-4:
            raise ExportError(f"{tmp / ONNX_FILE}: onnxruntime differs from torch by {err:.3g} (> 1e-4)")
        meta["files"]["onnx"] = ONNX_FILE
        meta["onnx"] = {"opset": opset, "inputs": {"z": ["batch", cfg.z_dim], **({"c": ["batch"]} if cfg.conditional
                                                                               else {})},
                        "input_types": {"z": "float32", **({"c": "int64"} if cfg.conditional else {})},
                        "output": {"x": ["batch", CHANNELS, IMAGE_SIZE, IMAGE_SIZE]},
                        "max_abs_diff_vs_torch": err}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _verify_round_trip(tmp, G, E, cfg.z_dim, cfg.conditional, num_classes)


def _verify_round_trip(export_dir: Path, G: nn.Module, E: nn.Module | None, z_dim: int, conditional: bool,
                       num_classes: int) -> None:
    """Load the written export and require bit-identical outputs; a broken export is never moved into place."""
    loaded = load_export(export_dir)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, z_dim, generator=gen)
    c = torch.arange(4) % num_classes if conditional else None
    with torch.inference_mode():
        x = G(z, c)
        if not torch.equal(x, loaded.G(z, c)):
            raise ExportError(f"{export_dir / GENERATOR_FILE}: the reloaded generator differs from the checkpoint's")
        if E is not None:
            a, b = E(x), loaded.E(x)
            if not all((p is None and q is None) or torch.equal(p, q) for p, q in zip(a, b)):
                raise ExportError(f"{export_dir / ENCODER_FILE}: the reloaded encoder differs from the checkpoint's")
