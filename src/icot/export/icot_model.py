"""A model trained by implicit-cot, answering through plain transformers.

This file is copied into every model directory icot writes; config.json's `auto_map` names a
class of it, `ICoT` + the architecture's own class (`ICoTGPT2LMHeadModel`, `ICoTLlamaForCausalLM`),
which this module builds on first use as a subclass of that class. It imports only torch and
transformers: a user needs neither icot nor its code.

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    inputs = tokenizer(["7 0 9 * 5 5 5||"], return_tensors="pt")
    text = tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True)
    answer = text.split("####")[-1].strip()

The layout is icot's: `[BOS] input SEP cot SEP #### answer EOS`, SEP and EOS being the
tokenizer's EOS token (its tokenizer reads the data format's `||` as SEP). The class adds what
icot adds when it answers, from config.json's `icot` settings:

- generation ends after the answer, at the second SEP after the prompt (plain `generate` would
  stop at the first, where the CoT ends);
- a position gap (stepwise internalization with kept positions): from the prompt's SEP on (or
  from the `gap_from`-th generated token), positions run `position_gap` further;
- continuous thoughts (Coconut, CODI): after the prompt, `<bot>`, then `thoughts` positions whose
  input embedding is the last hidden state before them (through CODI's projection, whose weights
  sit beside the model in `codi_projection.safetensors`), then `<eot>`; then decoding.

Positions come from the attention mask (each row's first attended token is position 0), so left
padding batches prompts of any length.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict

import torch
import transformers
from torch import nn
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.utils import cached_file

PREFIX = "ICoT"
PROJECTION_FILE = "codi_projection.safetensors"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class AnswerEnd(StoppingCriteria):
    """A row is done at its `stops`-th SEP after the prompt. `eos_token_id` tells generate that
    this criterion ends rows, so that it pads a finished row while the others go on."""

    def __init__(self, sep_id: int, prompt_width: int, stops: int):
        self.eos_token_id = sep_id
        self.prompt_width, self.stops = prompt_width, stops

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids[:, self.prompt_width :] == self.eos_token_id).sum(1) >= self.stops


def _read_safetensors(file: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (an 8-byte header size, a JSON header, the raw data)."""
    with open(file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        flat = torch.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]]) if end > start else torch.zeros(0)
        tensors[name] = flat.reshape(info["shape"]).clone()
    return tensors


def _projection(hidden: int, shape: dict) -> nn.Sequential:
    """CODI's projection MLP: Dropout, Linear, GELU, Linear, optional LayerNorm."""
    layers = [("dropout", nn.Dropout(shape["dropout"])), ("up", nn.Linear(hidden, shape["dim"])), ("act", nn.GELU()),
              ("down", nn.Linear(shape["dim"], hidden))]
    if shape["layer_norm"]:
        layers.append(("ln", nn.LayerNorm(hidden)))
    return nn.Sequential(OrderedDict(layers))


class ICoTGeneration:
    """What icot's decoding adds to the architecture's class (mixed in before it)."""

    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs):
        model = super().from_pretrained(name_or_path, *args, **kwargs)
        shape = model.config.icot.get("projection")
        if shape is not None:
            where = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            state = _read_safetensors(cached_file(name_or_path, PROJECTION_FILE, **where))
            projection = _projection(model.get_input_embeddings().embedding_dim, shape)
            projection.load_state_dict({k.removeprefix("projection."): v for k, v in state.items()})
            model.icot_projection = projection.to(device=model.device, dtype=model.dtype).eval()
        return model

    # ----- generation -------------------------------------------------------------------------

    def generate(self, inputs=None, stopping_criteria=None, **kwargs):
        """transformers' generate, ending each row after its answer (the second SEP it writes)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        criteria = StoppingCriteriaList(stopping_criteria or [])
        if prompt is not None:
            criteria.append(AnswerEnd(self.config.icot["sep_token_id"], prompt.shape[-1], 2))
        return super().generate(inputs, stopping_criteria=criteria, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        """The architecture's forward at icot's positions; a prompt (the first pass, nothing cached)
        of a model that thinks runs its continuous thoughts after it."""
        key = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(key)
        past = cache.get_seq_length() if cache is not None else 0
        rows, new = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if attention_mask is None:
            attention_mask = torch.ones(rows, past + new, dtype=torch.long, device=device)
        if attention_mask.shape[1] < past + new:  # the thoughts are cached past the prompt; every column after it is 1
            extra = attention_mask.new_ones(rows, past + new - attention_mask.shape[1])
            attention_mask = torch.cat([attention_mask, extra], dim=1)
        if past == 0:
            self._icot_prompt_width = new
        settings = self.config.icot
        if past == 0 and settings.get("thoughts") and input_ids is not None:
            return self._think(input_ids, attention_mask, key, cache, kwargs)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               position_ids=self._positions(attention_mask, new), **kwargs)

    def _positions(self, mask: torch.Tensor, new: int) -> torch.Tensor:
        """Position ids of the last `new` columns: attended tokens counted, plus the gap from the
        prompt's SEP (the prompt's last column) or from the gap_from-th generated token on."""
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        gap = self.config.icot.get("position_gap", 0)
        if gap:
            start = self._icot_prompt_width - 1 + self.config.icot.get("gap_from", 0)
            columns = torch.arange(mask.shape[1], device=mask.device)
            positions = positions + gap * (columns >= start)
        return positions[:, mask.shape[1] - new :]

    def _think(self, input_ids, mask, key: str, cache, kwargs: dict):
        """The prompt and `<bot>`, the continuous thoughts, `<eot>`, all into the cache; the output
        is `<eot>`'s, whose logits give the first generated token."""
        settings, project = self.config.icot, getattr(self, "icot_projection", None)
        marks = settings["thought_tokens"]
        kwargs = {k: v for k, v in kwargs.items() if k not in (key, "use_cache", "output_hidden_states", "logits_to_keep")}
        cache = cache if cache is not None else DynamicCache(config=self.config)
        one = mask.new_ones(len(mask), 1)

        def run(mask, width, **inputs):
            return super(ICoTGeneration, self).forward(attention_mask=mask, position_ids=self._positions(mask, width),
                                                       use_cache=True, output_hidden_states=True, **{key: cache},
                                                       **inputs, **kwargs)

        mask = torch.cat([mask, one], dim=1)
        begin = torch.full_like(input_ids[:, :1], marks["begin"])
        out = run(mask, input_ids.shape[1] + 1, input_ids=torch.cat([input_ids, begin], dim=1))
        for _ in range(settings["thoughts"]):
            state = out.hidden_states[-1][:, -1:]
            mask = torch.cat([mask, one], dim=1)
            out = run(mask, 1, inputs_embeds=project(state) if project is not None else state)
        mask = torch.cat([mask, one], dim=1)
        return run(mask, 1, input_ids=torch.full_like(begin, marks["end"]))


_BUILT: dict[str, type] = {}


def __getattr__(name: str):
    """`ICoT<Architecture>`: the architecture's own class (transformers' public class of that name)
    with ICoTGeneration mixed in, built once."""
    if not name.startswith(PREFIX) or not hasattr(transformers, name[len(PREFIX) :]):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        _BUILT[name] = type(name, (ICoTGeneration, getattr(transformers, name[len(PREFIX) :])), {"__module__": __name__})
    return _BUILT[name]
