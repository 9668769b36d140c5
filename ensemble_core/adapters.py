"""Adapters on disk: ordinary PEFT adapter directories, saved atomically and loaded only onto
the base model they were trained on.

An adapter directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (what
``PeftModel.from_pretrained`` reads), ``base_model.json`` (the fingerprint of the base model it
was trained on, checked on load) and, for trained adapters, ``training.json`` (the
``records.TrainResult``). docs/design.md, "Run directory", shows where they live.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .storage import jsonable, temporary_dir, temporary_name, temporary_prefix

log = logging.getLogger(__name__)

__all__ = ["AdapterMismatchError", "save_adapter", "load_adapter", "check_adapter_fits",
           "read_base_fingerprint", "load_weights", "TRAINING_FILE",
           "BASE_MODEL_FILE",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

TRAINING_FILE = "training.json"  # TrainResult of the adapter, next to the PEFT files
BASE_MODEL_FILE = "base_model.json"  # fingerprint of the base model the adapter was trained on
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterMismatchError(ValueError):
    """An adapter directory that does not fit the base model; the message names the directory
    and the mismatch."""


def _write_json_file(path: Path, obj) -> None:
    path.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


def save_adapter(model, out_dir, result=None, *,
                 adapter_name: str | None = None, base_fingerprint: dict | None = None) -> Path:
    """Write the (active, or ``adapter_name``) adapter of a PeftModel as an ordinary PEFT
    adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained``; plus ``training.json`` (the TrainResult, when given) and
    ``base_model.json`` (the base model fingerprint, when given; ``load_adapter`` checks it).

    The directory is built under a temporary sibling name and renamed into place when
    complete, so an interrupted save never leaves a complete-looking ``out_dir``; an existing
    ``out_dir`` is replaced. Local paths only (PEFT reads and writes local files).
    """
    out_dir = Path(out_dir)
    name = adapter_name or getattr(model, "active_adapter", None) or "default"
    if isinstance(name, (list, tuple)):
        name = name[0]
    if name not in getattr(model, "peft_config", {}):
        raise ValueError(f"save_adapter: the model has no adapter named {name!r} "
                         f"(adapters: {sorted(getattr(model, 'peft_config', {}))})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(temporary_prefix(f".{out_dir.name}"), out_dir.parent)
    try:
        model.save_pretrained(str(tmp), selected_adapters=[name])
        if name != "default":  # PEFT writes a non-default adapter into a subdirectory
            sub = tmp / name
            for f in sub.iterdir():
                os.replace(f, tmp / f.name)
            sub.rmdir()
        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (tmp / f).is_file():
                raise RuntimeError(f"save_adapter: PEFT did not write {f} for adapter {name!r}")
        _canonical_adapter_config(tmp / ADAPTER_CONFIG,
                                  (base_fingerprint or {}).get("name"))
        _canonical_model_card(tmp / "README.md", (base_fingerprint or {}).get("name"))
        if result is not None:
            _write_json_file(tmp / TRAINING_FILE, result.to_json())
        if base_fingerprint is not None:
            _write_json_file(tmp / BASE_MODEL_FILE, base_fingerprint)
        if out_dir.exists():
            old = out_dir.parent / temporary_name(f".{out_dir.name}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            from .storage import named_os_error

            raise named_os_error(e, f"cannot save the adapter {out_dir}") from e
        raise
    return out_dir


def _canonical_adapter_config(path: Path, base_name: str | None = None) -> None:
    """The same adapter saved by any process, on any machine, gives the same
    adapter_config.json (ensemble.json and versions pin it by sha256): PEFT keeps
    ``target_modules`` as a set and writes it in set order, which follows Python's
    per-process string hashing, so it is sorted (PEFT reads it back as a set); and it records
    ``base_model_name_or_path`` as the local directory the base model was loaded from (a
    model cache path), which is replaced by the base model's name as configured
    (``base_name``: "smollm2-135m", a hub id). PEFT's formatting is kept."""
    cfg = json.loads(path.read_text())
    changed = False
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        changed = True
    if base_name is not None and cfg.get("base_model_name_or_path") != base_name:
        cfg["base_model_name_or_path"] = base_name
        changed = True
    if changed:
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _model_card_base(text: str, base_name: str) -> str:
    out = []
    for ln in text.split("\n"):
        if ln.startswith("base_model:"):
            ln = f"base_model: {base_name}"
        elif ln.startswith("- base_model:adapter:"):
            ln = f"- base_model:adapter:{base_name}"
        out.append(ln)
    return "\n".join(out)


def _canonical_model_card(path: Path, base_name: str | None) -> None:
    """The model card PEFT writes beside an adapter (README.md) names the base model by the
    local directory it was loaded from, as adapter_config.json does: replaced by the base
    model's name, so every process on every machine writes the same bytes."""
    if base_name is None or not path.is_file():
        return
    text = path.read_text()
    new = _model_card_base(text, base_name)
    if new != text:
        path.write_text(new)


def _module_io(module) -> tuple[int | None, int | None]:
    """(in_features, out_features) of a linear-like module, LoRA-wrapped or not."""
    m = getattr(module, "base_layer", module)
    fin = getattr(module, "in_features", None) or getattr(m, "in_features", None)
    fout = getattr(module, "out_features", None) or getattr(m, "out_features", None)
    if fin is None and hasattr(m, "nx"):  # transformers Conv1D (GPT-2 style)
        fin, fout = m.nx, m.nf
    return fin, fout


def check_adapter_fits(base_model, adapter_dir) -> None:
    """Raise AdapterMismatchError unless every weight of a registered adapter kind in
    ``adapter_dir`` (``AdapterKind.weights``: LoRA's A and B, the bottleneck's projections, …)
    has a module of the right shape in ``base_model`` (a plain transformers model or a
    PeftModel).
    Reads only the safetensors header. Checked before PEFT touches the model, because a failed
    ``PeftModel.from_pretrained`` leaves LoRA layers injected into the base model."""
    from safetensors import safe_open

    from .adapter_kinds import weight_shapes

    shapes = weight_shapes()
    adapter_dir = Path(adapter_dir)
    cfg_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise AdapterMismatchError(f"adapter directory {adapter_dir} has no {f.name}: not a "
                                       "complete PEFT adapter")
    inner = base_model.get_base_model() if hasattr(base_model, "get_base_model") else base_model
    modules = dict(inner.named_modules())
    problems = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            path = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            # which side of the adapted module each weight must match (its kind says:
            # LoRA's A reads the module's input and B writes its output, ...)
            for marker, which, side in shapes:
                if marker in path:
                    mod_path = path.split(marker)[0]
                    break
            else:
                continue  # other PEFT weights (embeddings, magnitudes): left to PEFT
            module = modules.get(mod_path)
            if module is None:
                problems.append(f"{key}: the base model has no module {mod_path!r}")
                continue
            fin, fout = _module_io(module)
            if fin is None or len(shape) != 2:
                continue
            want = shape[1] if which == "in" else shape[0]
            have = fin if side == "input" else fout
            if want != have:
                problems.append(f"{key}: shape {list(shape)} needs {side} size {want}, module "
                                f"{mod_path!r} of the base model has {have}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AdapterMismatchError(
            f"adapter {adapter_dir} does not fit the base model "
            f"{getattr(getattr(inner, 'config', None), '_name_or_path', '?')!r}: "
            + "; ".join(problems[:5]) + more)


_FINGERPRINT_KEYS = ("name", "kind", "weights_sha256", "n_parameters")


def _check_fingerprint(adapter_dir: Path, expected: dict | None) -> None:
    f = adapter_dir / BASE_MODEL_FILE
    if expected is None or not f.is_file():
        return
    stored = json.loads(f.read_text())
    diff = [k for k in _FINGERPRINT_KEYS
            if stored.get(k) is not None and expected.get(k) is not None
            and stored[k] != expected[k]]
    # n_parameters differs between a 4-bit and a full-precision load of the same weights
    if "n_parameters" in diff and stored.get("quantization") != expected.get("quantization"):
        diff.remove("n_parameters")
    if diff:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on another base model: "
            + ", ".join(f"{k} {stored[k]!r} (adapter) vs {expected[k]!r} (base)" for k in diff))
    if stored.get("quantization") != expected.get("quantization"):
        log.warning("adapter %s was trained on a base with quantization %r, loading it on %r",
                    adapter_dir, stored.get("quantization"), expected.get("quantization"))


def load_adapter(base_model, adapter_dir, adapter_name: str | None = None, *,
                 base_fingerprint: dict | None = None, is_trainable: bool = False):
    """Load a saved adapter onto a base model and return the PeftModel.

    ``base_model`` is a plain transformers model (wrapped with ``PeftModel.from_pretrained``,
    which modifies it in place) or a PeftModel (the adapter is added with ``load_adapter``
    under ``adapter_name`` — required then — and the same PeftModel is returned; activate it
    with ``set_adapter``). Raises AdapterMismatchError naming the directory and the mismatch
    when the adapter does not fit: module shapes (e.g. another hidden size), modules missing in
    the base, or a stored base fingerprint (``base_model.json``) that differs from
    ``base_fingerprint``.
    """
    from peft import PeftModel

    from . import bottleneck  # noqa: F401  (registers the bottleneck PEFT method)

    adapter_dir = Path(adapter_dir)
    _check_fingerprint(adapter_dir, base_fingerprint)
    check_adapter_fits(base_model, adapter_dir)
    try:
        if isinstance(base_model, PeftModel):
            if adapter_name is None:
                raise ValueError("load_adapter: adapter_name is required when adding an adapter "
                                 "to a PeftModel")
            if adapter_name in base_model.peft_config:
                raise ValueError(f"load_adapter: the model already has an adapter named "
                                 f"{adapter_name!r}")
            base_model.load_adapter(str(adapter_dir), adapter_name=adapter_name,
                                    is_trainable=is_trainable)
            return base_model
        return PeftModel.from_pretrained(base_model, str(adapter_dir),
                                         adapter_name=adapter_name or "default",
                                         is_trainable=is_trainable)
    except RuntimeError as e:
        if "size mismatch" in str(e) or "Error(s) in loading state_dict" in str(e):
            raise AdapterMismatchError(f"adapter {adapter_dir} does not fit the base model: "
                                       f"{e}") from e
        raise


def load_weights(model, adapter_dir) -> None:
    """Set the active adapter of a PeftModel to the weights saved in ``adapter_dir`` (same
    adapter configuration), e.g. to continue training from them."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    check_adapter_fits(model, adapter_dir)
    from .adapter_kinds import weight_shapes

    result = set_peft_model_state_dict(model, load_file(str(adapter_dir / ADAPTER_WEIGHTS)))
    markers = [w.marker for w in weight_shapes()]
    missing = [k for k in getattr(result, "missing_keys", [])
               if any(m in k for m in markers)]
    if missing:
        raise AdapterMismatchError(f"adapter {adapter_dir} lacks weights for {missing[:3]}")


def read_base_fingerprint(adapter_dir) -> dict:
    """The fingerprint of the base model an adapter was trained on (``base_model.json``)."""
    f = Path(adapter_dir) / BASE_MODEL_FILE
    if not f.is_file():
        raise AdapterMismatchError(f"adapter {adapter_dir} has no {BASE_MODEL_FILE}")
    return json.loads(f.read_text())
