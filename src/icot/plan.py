"""A memory plan before any work: `icot train --config X --plan`.

The model is built on the meta device (shapes, no memory) from its config.json: a preset's
(models.py), a local directory's, or, for a hub id, the architecture file shipped in
icot/architectures/ (no download; a model already in the Hugging Face cache is read from there).
From it, per process:

- parameters: every parameter tensor, in the weights' dtype (bf16 for `precision: bf16`, fp32
  otherwise: with mixed precision the fp32 weights are the master weights);
- gradients: the trainable parameters only, in the weights' dtype;
- optimizer: AdamW's two moments per trainable parameter in its dtype, plus its 4-byte step count
  per trainable tensor;
- activations: an estimate for one micro-batch (`activation_bytes`);
- AdamW's step temporaries: torch's foreach AdamW (the default on a GPU) computes the square root of
  every second moment at once, one more copy of the trainable parameters, after the activations are
  freed; the peak counts the larger of the two;

under a strategy: `ddp` (each process holds all of it) or `fsdp` (parameters, gradients and
optimizer state divided by the processes, plus the largest FSDP unit gathered whole with its
gradient: an estimate). LoRA (`lora.r` > 0) is applied with peft to the meta model, so the
adapters (and `modules_to_save` copies) are counted exactly; only they train.

The parameter, gradient and optimizer numbers are exact for what the training loop builds
(tests/test_plan.py compares them with a real process); the activations are an estimate, and
CUDA's own context and the allocator's cache (about 0.5 to 2 GB) are not counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from icot import adapters
from icot.errors import UserError

ARCHITECTURES = Path(__file__).parent / "architectures"
STRATEGIES = ("ddp", "fsdp")
DEFAULT_SEQ_CAP = 1024
BPE_VOCAB = 4096  # icot tokenizer train's default --vocab-size
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'80GB', '40 GiB', '81920MiB', '8e10' -> bytes (GB = 10**9 bytes, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", str(text).lower())
    if not match:
        raise UserError(f"--plan-gpu-memory {text}: expected a size such as 80GB, 40GiB or 81920MiB")
    value = float(match.group(1)) * _UNITS[match.group(2) or ""]
    if value <= 0:
        raise UserError(f"--plan-gpu-memory {text}: must be positive")
    return int(value)


def architecture_dir(hub_id: str) -> Path:
    """Where the shipped config.json of hub id `org/name` is: architectures/org__name/."""
    return ARCHITECTURES / hub_id.replace("/", "__")


def shipped_architectures() -> list[str]:
    return sorted(p.parent.name.replace("__", "/") for p in ARCHITECTURES.glob("*/config.json"))


@dataclasses.dataclass
class Plan:
    """Bytes per process, and what they were computed from."""

    model: str
    source: str  # where the architecture came from
    architecture: str
    strategy: str
    processes: int
    precision: str
    weight_dtype: torch.dtype
    parameters: int  # numbers of elements
    trainable: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    gathered_bytes: int  # fsdp: the largest unit's parameters and gradient, unsharded
    whole_bytes: int  # fsdp: the whole model in its compute dtype, on the main process while it validates and saves
    activation_bytes: int
    step_bytes: int  # AdamW's foreach temporaries in optimizer.step(), after the activations are freed
    micro_batch: int
    seq_len: int
    seq_source: str
    gradient_checkpointing: bool
    lora: str
    gpu_memory: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """The peak: the states, plus the activations in the backward pass or the optimizer's temporaries in
        its step, whichever is larger (the activations are freed before the step)."""
        training = (self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.gathered_bytes
                    + max(self.activation_bytes, self.step_bytes))
        return max(training, self.parameter_bytes + self.optimizer_bytes + self.whole_bytes)  # validation: no gradients

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total_bytes <= self.gpu_memory

    def table(self) -> str:
        dtype = str(self.weight_dtype).replace("torch.", "")
        share = "replicated on each process" if self.strategy == "ddp" else f"sharded over {self.processes} processes"
        lines = [
            f"memory plan: {self.model} ({self.architecture}; {self.source})",
            f"  {self.parameters:,} parameters, {self.trainable:,} trainable ({self.lora}); weights in {dtype} "
            f"(precision {self.precision})",
            f"  strategy {self.strategy}, {self.processes} process{'es' if self.processes > 1 else ''}: {share}",
            f"  micro-batch {self.micro_batch} x {self.seq_len} tokens ({self.seq_source}); gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}",
            "",
            "| per process | bytes | GB |",
            "|---|---:|---:|",
        ]
        rows = [("parameters", self.parameter_bytes), ("gradients", self.gradient_bytes),
                ("optimizer (AdamW)", self.optimizer_bytes)]
        if self.strategy == "fsdp":
            rows.append(("largest unit gathered (estimate)", self.gathered_bytes))
        rows += [("activations (estimate)", self.activation_bytes),
                 ("AdamW step temporaries (estimate)", self.step_bytes)]
        if self.strategy == "fsdp":
            rows.append(("main process validating: the whole model (no gradients then)", self.whole_bytes))
        rows.append(("total: peak (states + the larger of the temporaries above)", self.total_bytes))
        lines += [f"| {name} | {value:,} | {value / 1e9:.2f} |" for name, value in rows]
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"\n{verdict} in {self.gpu_memory / 1e9:.1f} GB per GPU ({self.total_bytes / 1e9:.2f} GB "
                         f"planned, {100 * self.total_bytes / self.gpu_memory:.0f}%; CUDA's context and allocator "
                         "cache not counted)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _dtype_name(value) -> str | None:
    if value is None:
        return None
    return str(value).replace("torch.", "")


# ----- the model on the meta device ------------------------------------------------------------

def resolve_architecture(model: str, config_file=None, seen=()):
    """(transformers config, where it came from) for a model that is not a preset: a local directory,
    a shipped architecture, the Hugging Face cache, or a run directory another config in the same
    folder as `config_file` will produce (its `out`), planned as that config's model."""
    from transformers import AutoConfig

    path = Path(model)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path)), f"config.json of directory {path}", None
    shipped = architecture_dir(model)
    if "/" not in model.strip("/") or model.count("/") == 1:
        if (shipped / "config.json").is_file():
            return AutoConfig.from_pretrained(str(shipped)), f"shipped architecture {shipped.name}/config.json", None
        with contextlib.suppress(Exception):
            cached = AutoConfig.from_pretrained(model, local_files_only=True)
            return cached, "config.json in the Hugging Face cache", None
    producer = _producing_config(path, config_file, seen)
    if producer is not None:
        return None, None, producer
    raise UserError(f"model {model}: cannot plan it offline (not a preset, not a directory with a config.json, not "
                    f"among the shipped architectures: {', '.join(shipped_architectures())}); give --plan-model with "
                    "the architecture it has (a preset, a directory or a shipped hub id)")


def _producing_config(path: Path, config_file, seen):
    """The config in `config_file`'s folder whose run directory `out` holds `path` (RUN/best, RUN/...):
    a model that an earlier run in the repo's recipe will write."""
    if config_file is None:
        return None
    run = path.parent if path.name in ("best",) or path.name.startswith("checkpoint") else path
    from icot.config import load_yaml

    for other in sorted(Path(config_file).parent.glob("*.yaml")):
        if other.resolve() in seen:
            continue
        with contextlib.suppress(UserError):
            values = load_yaml(other)
            out = values.get("out")
            if out is not None and Path(str(out)) == run:
                return other
    return None


def preset_vocabulary(config) -> tuple[int, int, str]:
    """(vocabulary size, eos id, how it was found) of a preset model: the word-level vocabulary of
    the data files present (what the loop builds), or the tokenizer named in the config."""
    from icot.data.format import read_examples
    from icot.data.tokenizers import load_tokenizer, word_tokenizer

    if config.tokenizer not in (None, "word"):
        try:
            tokenizer = load_tokenizer(config.tokenizer)
        except Exception:  # noqa: BLE001 - not trained yet, or a hub id not in the cache
            return (BPE_VOCAB, 0, f"tokenizer {config.tokenizer} not here: {BPE_VOCAB:,} tokens assumed "
                                  "(icot tokenizer train's default --vocab-size; --plan-vocab-size sets it)")
        return len(tokenizer), tokenizer.eos_token_id, f"tokenizer {config.tokenizer}"
    try:
        files = config.data_files()
        missing = [f for f in files.values() if f and not Path(f).is_file()]
    except UserError:  # the data directory is not here
        files = {"train": config.train_file, "valid": config.valid_file, "test": config.test_file}
        missing = [f for f in files.values() if f and not Path(f).is_file()] + [f"data directory {config.data}"]
    present = [f for f in files.values() if f and Path(f).is_file()]
    texts = (f"{e.question} {e.cot} {e.answer}" for f in present for e in read_examples(f))
    tokenizer = word_tokenizer(texts)
    how = f"word-level vocabulary of {len(present)} data file(s)"
    if missing:
        how += f"; {', '.join(missing)} not here, so its words are not counted (a smaller embedding than the run's)"
    return len(tokenizer), tokenizer.eos_token_id, how


def meta_model(config, config_file=None, plan_model: str | None = None, vocab_size: int | None = None):
    """(model on the meta device, description of its source, notes) for the LM `config.model` (or
    `plan_model`), in the dtype the training loop gives it."""
    from transformers import AutoModelForCausalLM

    from icot.models import build_preset, is_preset

    notes = []
    name = plan_model or config.model
    seen = {Path(config_file).resolve()} if config_file else set()
    builder = config  # the config whose run builds the model (another one's for a run directory it writes)
    while True:
        if is_preset(name):
            if vocab_size is not None:
                vocab, eos, how = vocab_size, 0, "vocabulary size from --plan-vocab-size"
            else:
                vocab, eos, how = preset_vocabulary(builder)
            with torch.device("meta"):
                model = build_preset(name, vocab, eos, builder.max_positions)
            source = f"preset {name}, {how}"
            break
        arch, source, producer = resolve_architecture(name, config_file, seen)
        if producer is None:
            if vocab_size is not None:
                arch.vocab_size = vocab_size
            with torch.device("meta"):  # training loads fp32 weights unless precision is bf16 (cast below)
                model = AutoModelForCausalLM.from_config(arch, dtype=torch.float32, attn_implementation="sdpa")
            break
        from icot.api import train_config

        seen.add(producer.resolve())
        notes.append(f"{name} is written by {producer} (its out); planned as that config's model")
        _, builder = train_config(str(producer))
        name, config_file = builder.model, producer
    if config.precision == "bf16":
        model = model.to(torch.bfloat16)
    if plan_model:
        source += f"; --plan-model {plan_model}"
    return model, source, notes


# ----- bytes --------------------------------------------------------------------------------------

def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(model, shards: int = 1) -> dict:
    """Parameter, gradient and AdamW bytes of a (meta or real) model as the loop trains it: AdamW over
    model.parameters() keeps exp_avg and exp_avg_sq per parameter that gets a gradient, in its dtype,
    and a float32 step count per such tensor. Sharded over `shards` processes, each tensor is cut
    along its first dimension, padded to equal pieces (FSDP2); the step counts stay whole."""
    params = list(model.parameters())  # each shared (tied) tensor once
    trainable = [p for p in params if p.requires_grad]
    size = tensor_bytes if shards == 1 else lambda tensors: shard_bytes(tensors, shards)
    return {"parameters": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
            "parameter_bytes": size(params), "gradient_bytes": size(trainable),
            "optimizer_bytes": 2 * size(trainable) + 4 * len(trainable)}


def shard_bytes(tensors, shards: int) -> int:
    """The bytes of the first process's piece of each tensor, cut in `shards` along dimension 0."""
    return sum(math.ceil(t.shape[0] / shards) * (t.numel() // t.shape[0]) * t.element_size() if t.dim() else
               t.element_size() for t in tensors)


def largest_unit_bytes(model) -> int:
    """The largest FSDP unit when each decoder layer is one unit and the rest (embeddings, head, final
    norm) the root one: its parameter bytes."""
    from icot.models import decoder_layers

    layers = decoder_layers(model)
    layer_ids = {id(p) for p in layers.parameters()}
    rest = tensor_bytes(p for p in model.parameters() if id(p) not in layer_ids)
    return max([rest] + [tensor_bytes(layer.parameters()) for layer in layers])


_GATED = ("llama", "mistral", "phi3", "qwen2")  # gated (SwiGLU) MLPs and RMSNorm in fp32
_UNFUSED = ("gelu_new",)  # GPT-2's own GELU: its tanh formula in Python ops, each keeping a tensor


def _shape(config) -> dict:
    """Hidden size, heads, kv heads, intermediate size, layers, vocabulary, gated MLP, dropout."""
    get = lambda *keys, default=None: next((getattr(config, k) for k in keys if getattr(config, k, None) is not None),
                                           default)
    hidden = get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    inner = get("intermediate_size", "n_inner", default=None) or 4 * hidden
    act = str(get("hidden_act", "activation_function", default="gelu"))
    dropout = any((get(k, default=0) or 0) > 0 for k in ("resid_pdrop", "attn_pdrop", "hidden_dropout", "resid_dropout",
                                                         "attention_dropout", "embd_pdrop"))
    return {"h": hidden, "a": heads, "kv": get("num_key_value_heads", default=heads), "f": inner,
            "layers": get("num_hidden_layers", "n_layer"), "vocab": config.vocab_size,
            "gated": act in ("silu", "swish") or getattr(config, "model_type", "") in _GATED,
            "rms_norm": getattr(config, "model_type", "") in _GATED, "act": act,
            "dropout": dropout}


def activation_bytes(config, batch: int, seq: int, precision: str, checkpointing: bool) -> int:
    """Activations kept for the backward pass of one micro-batch of `batch` rows of `seq` tokens: an estimate.

    Per decoder layer, in 16-bit bytes, after Korthikanti et al. (2022), "Reducing activation recomputation
    in large transformer models", table 2 (s*b*h*(34 + 5*a*s/h) for GPT with a 4h GELU MLP and dropout),
    generalised to the model's shape (s tokens, b rows, h hidden, f intermediate, h_kv = h x kv heads / heads):

    - attention: 2sbh (norm output, the QKV input) + 2sbh (Q) + 4sb*h_kv (K, V) + 2sbh (the fused
      attention's output) + 2sbh (its transposed copy, the output projection's input) + sbh (dropout mask,
      1 byte, if the model has dropout). PyTorch's fused attention (sdpa, which the models use) keeps no
      s x s matrix, so Korthikanti's 5as^2b term is replaced by the 2sbh of its output;
    - MLP: 2sbh (norm output) + 4sbf for GELU (its input and output) or 8sbf for a gated MLP (SwiGLU:
      gate, activation, up, product) + sbh (dropout mask); GPT-2's own `gelu_new` (hub gpt2, gpt2-medium) is
      its tanh formula in Python operations, which keep three more sbf tensors: + 6sbf (the presets use the
      fused gelu_pytorch_tanh);
    - the two norms' inputs: 4sbh; an RMSNorm model (Llama, Mistral, Phi-3, Qwen2) normalises in fp32, so
      under 16-bit precisions its norms keep fp32 inputs: 4sbh more.

    For GPT-2's shape with a fused GELU this is 36sbh (Korthikanti's 34sbh with the fused attention's
    output for the s x s term). fp32 activations (precision fp32) are twice the 16-bit bytes. Beside the layers, the logits:
    s*b*V in the activations' dtype (the model returns them) plus 8 bytes (the loss's fp32 log-softmax and,
    as the backward pass starts, its fp32 gradient). With gradient checkpointing each layer keeps only its
    input (2sbh), plus one layer's activations recomputed at a time in the backward pass.
    Checked against the tensors autograd saves on a CPU (tests/test_plan.py): within 10% per layer.
    """
    shape = _shape(config)
    s, b, h, f, kv = seq, batch, shape["h"], shape["f"], shape["h"] * shape["kv"] // shape["a"]
    mask = s * b * h if shape["dropout"] else 0
    attention = 2 * s * b * h + 2 * s * b * h + 4 * s * b * kv + 2 * s * b * h + 2 * s * b * h + mask
    mlp = 2 * s * b * h + (8 if shape["gated"] else 4) * s * b * f + mask
    if shape["act"] in _UNFUSED:
        mlp += 6 * s * b * f
    norms = 4 * s * b * h
    scale = 2 if precision == "fp32" else 1
    fp32_norms = 4 * s * b * h if shape["rms_norm"] and precision != "fp32" else 0
    per_layer = (attention + mlp + norms) * scale + fp32_norms
    layers = shape["layers"]
    kept = (layers * 2 * s * b * h * scale + per_layer) if checkpointing else layers * per_layer
    width = 4 if precision == "fp32" else 2
    logits = s * b * shape["vocab"] * (width + 8)
    return kept + logits


# ----- sequence length ------------------------------------------------------------------------

def sequence_length(config, model, seq_len: int | None) -> tuple[int, str]:
    """--plan-seq-len; else a stepwise run's max_len_train (longer batches are skipped); else the
    longest training row when the data and the tokenizer are here (a preset's word-level one); else
    the model's positions capped at 1024."""
    from icot.models import is_preset, max_positions

    if seq_len is not None:
        return seq_len, "--plan-seq-len"
    limit = getattr(config, "max_len_train", None)
    positions = max_positions(model)
    if limit:
        return min(limit, positions or limit), "max_len_train"
    longest = _longest_row(config) if is_preset(config.model) else None
    if longest:
        return longest, "the training data's longest row"
    if positions is None:
        return DEFAULT_SEQ_CAP, f"default {DEFAULT_SEQ_CAP}"
    return min(positions, DEFAULT_SEQ_CAP), f"the model's {positions} positions" + (
        f" capped at {DEFAULT_SEQ_CAP}" if positions > DEFAULT_SEQ_CAP else "")


def _longest_row(config) -> int | None:
    from icot.data.format import read_examples
    from icot.data.layout import Layout, encode
    from icot.data.tokenizers import word_tokenizer

    try:
        train = config.data_files()["train"]
    except UserError:
        train = config.train_file
    if config.tokenizer not in (None, "word") or not train or not Path(train).is_file():
        return None
    examples = read_examples(train)
    if config.max_train_examples:
        examples = examples[: config.max_train_examples]
    if not examples:
        return None
    tokenizer = word_tokenizer(f"{e.question} {e.cot} {e.answer}" for e in examples)
    data = encode(tokenizer, Layout.for_tokenizer(tokenizer), examples, keep_examples=False, desc="plan")
    return int(data.lengths.max())


# ----- the plan -----------------------------------------------------------------------------------

def plan(config, config_file=None, *, strategy: str | None = None, processes: int = 1, gpu_memory: int | None = None,
         seq_len: int | None = None, plan_model: str | None = None, vocab_size: int | None = None) -> Plan:
    """The memory plan of training `config` (a TrainConfig as `icot train` builds it); the strategy
    is the config's (fsdp or not) unless given."""
    strategy = strategy or ("fsdp" if config.fsdp else "ddp")
    if strategy not in STRATEGIES:
        raise UserError(f"--plan-strategy {strategy}: expected one of {', '.join(STRATEGIES)}")
    if processes < 1:
        raise UserError(f"--plan-processes {processes}: must be at least 1")
    if seq_len is not None and seq_len < 1:
        raise UserError(f"--plan-seq-len {seq_len}: must be at least 1")
    model, source, notes = meta_model(config, config_file, plan_model, vocab_size)
    lm_config = model.config
    lora = config.lora
    if lora.r > 0:
        adapters.check_lora(lora, config.model, model)
        model = adapters.add_lora(model, lora)
        lora_text = f"LoRA r {lora.r}: the adapters" + (f" and {', '.join(lora.modules_to_save)}"
                                                       if lora.modules_to_save else "") + " train"
    else:
        lora_text = "every weight trains"
    counts = state_bytes(model, processes if strategy == "fsdp" else 1)
    weight_dtype = next(model.parameters()).dtype
    seq, seq_source = sequence_length(config, model, seq_len)
    micro = config.batch_size
    activations = activation_bytes(lm_config, micro, seq, config.precision, config.gradient_checkpointing)
    gathered = whole = 0
    # torch's foreach AdamW (its default on a GPU) takes the square root of every exp_avg_sq at once: one more
    # copy of the trainable parameters in the optimizer's dtype, live during the step
    step = counts["gradient_bytes"]
    if strategy == "fsdp":
        unit = largest_unit_bytes(model)
        compute = 2 if config.precision != "fp32" else 4
        gathered = 2 * unit * compute // weight_dtype.itemsize  # the unit's weights and gradient, in compute dtype
        whole = counts["parameters"] * compute
        notes.append(f"fsdp: the main process also keeps the whole model in host memory ({whole / 1e9:.2f} GB), "
                     "moved to its GPU while it validates and saves best/")
    method = getattr(config, "method", "explicit")
    if method in ("kd", "codi", "coconut"):
        notes.append(f"method {method}: the plan counts the LM `model` alone ("
                     + {"kd": "its stages train one at a time; a stage that reads a frozen teacher holds its weights "
                              "too",
                        "codi": "CODI's projection and its added tokens are not counted; a teacher pass adds its "
                                "activations",
                        "coconut": "the added thought tokens are not counted; latent passes add activations"}[method]
                     + ")")
    if processes > 1 and strategy == "ddp":
        notes.append("ddp: each process also holds gradient buckets for the all-reduce (up to the gradients' size "
                     "again with default settings), not counted")
    return Plan(model=config.model, source=source, architecture=type(model.get_base_model() if hasattr(
        model, "get_base_model") else model).__name__, strategy=strategy, processes=processes,
        precision=config.precision, weight_dtype=weight_dtype, parameters=counts["parameters"],
        trainable=counts["trainable"], parameter_bytes=counts["parameter_bytes"],
        gradient_bytes=counts["gradient_bytes"], optimizer_bytes=counts["optimizer_bytes"], gathered_bytes=gathered,
        whole_bytes=whole,
        activation_bytes=activations, step_bytes=step, micro_batch=micro, seq_len=seq, seq_source=seq_source,
        gradient_checkpointing=config.gradient_checkpointing, lora=lora_text, gpu_memory=gpu_memory, notes=notes)


def to_json(p: Plan) -> str:
    fields = {k: v for k, v in dataclasses.asdict(p).items() if k != "weight_dtype"}
    return json.dumps({**fields, "weight_dtype": _dtype_name(p.weight_dtype), "total_bytes": p.total_bytes,
                       "fits": p.fits}, indent=2)
