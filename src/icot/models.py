"""Building, loading and saving models, and reaching into their decoder layers with hooks.

`--model` is a preset name (random initialisation, from scratch), a local directory, or a hub
id. Saved models are plain Hugging Face directories (safetensors weights, config, tokenizer)
that `AutoModelForCausalLM.from_pretrained` loads; our metadata sits beside them in icot.json.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from icot.data.tokenizers import portable_config
from icot.errors import UserError, warn
from icot.paths import writing_aside

METADATA = "icot.json"
# Any one of these holds a Hugging Face tokenizer (fast, GPT-2 BPE, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")

# Random-initialised shapes. The small ones, for synthetic tasks from scratch, use no dropout;
# GPT-2 Small/Medium shapes keep GPT-2's 0.1 so they train like the papers' models. All GPT-2
# presets use the fused tanh-GELU kernel: the same function as GPT-2's, ~1.5x faster on CPU.
_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
PRESETS = {
    "micro": ("gpt2", dict(n_layer=2, n_head=4, n_embd=128, **_NO_DROPOUT)),
    "mini": ("gpt2", dict(n_layer=4, n_head=4, n_embd=128, **_NO_DROPOUT)),
    "tiny": ("gpt2", dict(n_layer=2, n_head=4, n_embd=256, **_NO_DROPOUT)),
    "small": ("gpt2", dict(n_layer=4, n_head=4, n_embd=256, **_NO_DROPOUT)),
    # tiny at 1.5x its width, between tiny and the paper's 768 (wide)
    "tiny-384": ("gpt2", dict(n_layer=2, n_head=4, n_embd=384, **_NO_DROPOUT)),
    # the shape that learned 4x4 from scratch by stepwise internalization in Bai et al. (2025)
    "wide": ("gpt2", dict(n_layer=2, n_head=4, n_embd=768, **_NO_DROPOUT)),
    # micro's width with 6 layers: ICoT-KD spreads the CoT over the layers, so it needs depth
    "micro-deep": ("gpt2", dict(n_layer=6, n_head=4, n_embd=128, **_NO_DROPOUT)),
    # twice micro-deep's teacher states at about half its compute, for ICoT-KD on longer CoTs (3x3: 24 tokens)
    "narrow-deep": ("gpt2", dict(n_layer=12, n_head=4, n_embd=64, **_NO_DROPOUT)),
    # micro-deep's depth at half its width: a third of its compute per step (the demo's ICoT-KD row)
    "nano-deep": ("gpt2", dict(n_layer=6, n_head=4, n_embd=64, **_NO_DROPOUT)),
    "gpt2-small": ("gpt2", dict(n_layer=12, n_head=12, n_embd=768)),
    "gpt2-medium-shape": ("gpt2", dict(n_layer=24, n_head=16, n_embd=1024)),
    "tiny-llama": ("llama", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 hidden_size=256, intermediate_size=688)),
}
MAX_POSITIONS = 1024


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_preset(name: str, vocab_size: int, eos_id: int, max_positions: int = MAX_POSITIONS):
    from transformers import GPT2Config, LlamaConfig  # here: loading a saved model needs only its own architecture

    arch, shape = PRESETS[name]
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=max_positions, bos_token_id=eos_id,
                            eos_token_id=eos_id, pad_token_id=eos_id, activation_function="gelu_pytorch_tanh", **shape)
    else:
        config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_positions,
                             bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id,
                             tie_word_embeddings=True, **shape)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def empty_model(name_or_path: str, max_positions: int = 1024):
    """The model's modules without weights (meta device): its shape and module names, at no cost."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if is_preset(name_or_path):
            return build_preset(name_or_path, 16, 0, max_positions)
        try:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model {name_or_path}: cannot read its config.json ({first})") from None


def load_model(name_or_path: str, dtype: torch.dtype | None = None):
    """A pretrained causal LM from a local directory or a hub id."""
    from safetensors import SafetensorError

    from icot.paths import check_local_dir

    check_local_dir(name_or_path, "model")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged weights file
        where = "directory" if os.path.isdir(name_or_path) else "hub id"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        presets = ", ".join(PRESETS)
        raise UserError(f"cannot load model from {where} '{name_or_path}' (presets: {presets}): {first}") from None
    check_weights_match(name_or_path, model, info)
    return model


_LOADING_PROBLEMS = {"missing_keys": "missing", "unexpected_keys": "unexpected", "mismatched_keys": "of another shape"}


def check_weights_match(name_or_path: str, model, info: dict) -> None:
    """The weights fill exactly the model that config.json describes: transformers initialises what
    is missing or of another shape at random and says so only in a warning (the CLI hides those)."""
    found = []
    for key, what in _LOADING_PROBLEMS.items():
        names = sorted(k[0] if isinstance(k, tuple) else k for k in info.get(key) or ())  # mismatched: (name, shapes)
        if names:
            found.append(f"{len(names)} {what} (e.g. {', '.join(names[:2])})")
    if found:
        raise UserError(f"model {name_or_path}: its weights do not match the {type(model).__name__} its config.json "
                        f"describes, tensors {'; '.join(found)}; expected the config.json saved with these weights")


def check_tokenizer_files(path) -> None:
    """A local model directory holds its tokenizer: without one, transformers builds a stand-in
    from config.json that knows next to no tokens, and every answer comes out wrong."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or any((folder / name).is_file() for name in TOKENIZER_FILES):
        return
    raise UserError(f"model {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) beside its "
                    "config.json; expected the tokenizer saved with the model (icot saves it beside the weights)")


def check_vocabulary_fits(path, tokenizer, model) -> None:
    """Every token id the tokenizer can give has a row in the model's embedding (else indexing fails mid-run)."""
    rows = getattr(model.config, "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UserError(f"model {path}: its tokenizer has {len(tokenizer)} tokens but the model only {rows} "
                        "(config.json vocab_size); expected the tokenizer saved with the model")


def max_positions(model) -> int | None:
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def read_metadata(path) -> dict:
    """icot.json beside a saved model, checked field by field (icot.metadata); {} if there is none."""
    from icot.metadata import check_metadata

    file = Path(path) / METADATA
    if not file.exists():
        return {}
    if not file.is_file():
        raise UserError(f"{file}: not a file; expected icot's metadata, a JSON object")
    try:
        meta = json.loads(file.read_bytes())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON ({e.msg}); expected icot's metadata, a JSON object") from None
    except RecursionError:
        raise UserError(f"{file}: JSON nested too deep to read; expected icot's metadata, a flat JSON object") from None
    except UnicodeDecodeError:
        raise UserError(f"{file}: not valid UTF-8 text; expected icot's metadata, a JSON object") from None
    check_metadata(meta, file)
    return meta


def save_model(model, tokenizer, out, metadata: dict) -> None:
    """save_pretrained (safetensors) + tokenizer + icot.json, and the remote code that answers
    without icot (icot.export), written aside then swapped in."""
    from icot.export import write_remote_code

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    with writing_aside(tmp, f"model {out}", "the model saved there before, if any, is left as it was"):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        portable_config(tmp)  # loads under transformers 4.x too
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        try:
            write_remote_code(tmp, metadata)
        except UserError as e:  # the model is icot's all the same: saved, without the plain route
            warn(f"{out}: saved without remote code ({e})")
    replace_dir(tmp, out)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory src to dst, replacing dst; dst is never left half-written."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        _rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        _rmtree(old)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def decoder_layers(model) -> nn.ModuleList:
    """The list of decoder blocks of any Hugging Face causal LM (transformer.h, model.layers, ...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    best = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if len(module) == n:
                return module
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}")
    return best


def lm_shape(lm) -> tuple[int, int]:
    """(decoder layers, hidden size) of a causal LM."""
    return len(decoder_layers(lm)), lm.get_input_embeddings().embedding_dim


class LMWithModules(nn.Module):
    """A causal LM plus extra modules (a method's own), saved as the LM's Hugging Face directory
    with the modules' weights beside it in `modules_file`. Subclasses name the file and the
    method (`kind`, for error messages)."""

    modules_file = "modules.safetensors"
    kind = "icot"

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.num_layers, self.hidden_size = lm_shape(lm)

    @property
    def config(self):
        return self.lm.config

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def write(self, tokenizer, folder: Path, metadata: dict) -> None:
        save_model(self.lm, tokenizer, folder, metadata)
        save_file(self.extra_state_dict(), str(folder / self.modules_file))

    def save(self, tokenizer, out: Path, metadata: dict) -> None:
        """Written aside, then swapped in: `out` is never left half-written."""
        tmp = out.with_name(out.name + ".modules-tmp")
        self.write(tokenizer, tmp, metadata)
        replace_dir(tmp, out)

    def load_extra(self, path: Path) -> None:
        file = path / self.modules_file
        if not file.is_file():
            raise UserError(f"{path}: no {self.modules_file} (not a saved {self.kind} model)")
        state = load_file(str(file), device=str(self.lm.device))
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError:  # a tensor of the wrong shape
            missing, unexpected = [], ["(shapes differ)"]
        missing = [k for k in missing if not k.startswith("lm.")]
        if missing or unexpected:
            raise UserError(f"{file}: does not match the model beside it ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected tensors)")


def _hidden_from_args(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _replace_hidden(args, kwargs, hidden):
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden,) + tuple(args[1:]), kwargs


@contextmanager
def layer_input_hooks(model, fn):
    """Run fn(layer_index, hidden_states) before each decoder layer; a returned tensor replaces
    the layer's input hidden states (None leaves them unchanged)."""
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        def pre_hook(module, args, kwargs, index=index):
            new = fn(index, _hidden_from_args(args, kwargs))
            return None if new is None else _replace_hidden(args, kwargs, new)

        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
