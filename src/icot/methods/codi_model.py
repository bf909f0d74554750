"""Answering with a saved CODI model: the LM with its projection, and the loader (the registry's
loader for `codi`). The trainer (codi.py) imports the training loop; answering needs only this."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

from torch import nn

from icot.data.tokenizers import load_tokenizer
from icot.errors import UserError
from icot.methods.thoughts import ThoughtLM, ThoughtPredictor, ThoughtTokens, check_thought_tokens, continuous_forward
from icot.models import LMWithModules, load_model


def projection_mlp(hidden: int, dim: int, dropout: float, layer_norm: bool) -> nn.Sequential:
    """The authors' projection (src/model.py): Dropout, Linear, GELU, Linear, optional LayerNorm."""
    layers = [("dropout", nn.Dropout(dropout)), ("up", nn.Linear(hidden, dim)), ("act", nn.GELU()),
              ("down", nn.Linear(dim, hidden))]
    if layer_norm:
        layers.append(("ln", nn.LayerNorm(hidden)))
    return nn.Sequential(OrderedDict(layers))


class CodiModel(LMWithModules):
    """The LM plus the projection (None: thoughts are the raw last hidden states, use_prj false).
    Its forward runs both tasks, so a distributed wrapper sees one forward per step."""

    modules_file = "codi_projection.safetensors"
    kind = "CODI"

    def __init__(self, lm, latent_id: int, shape: dict | None):
        super().__init__(lm)
        self.latent_id = latent_id
        self.projection = None
        if shape is not None:
            self.projection = projection_mlp(self.hidden_size, shape["dim"], shape["dropout"], shape["layer_norm"])
            self.projection.to(device=lm.device, dtype=lm.dtype)

    def forward(self, teacher: dict, student: dict):
        """(teacher output, student ThoughtOutput), both with every layer's hidden states."""
        teacher_out = self.lm(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"],
                              position_ids=teacher["position_ids"], output_hidden_states=True, use_cache=False)
        student_out = continuous_forward(self.lm, student["input_ids"], student["attention_mask"],
                                         student["position_ids"], self.latent_id, self.projection,
                                         output_hidden_states=True)
        return teacher_out, student_out

    def thought_lm(self) -> ThoughtLM:
        return ThoughtLM(self.lm, self.latent_id, self.projection)


def load_codi_predictor(path, meta: dict, device=None, dtype=None) -> ThoughtPredictor:
    """A saved CODI model: the Hugging Face directory, the projection beside it, icot.json's settings."""
    tokenizer = load_tokenizer(str(path))
    try:
        marks, thoughts, shape = ThoughtTokens(**meta["thought_tokens"]), int(meta["thoughts"]), meta["projection"]
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}/icot.json: not a complete CODI record (missing {e})") from None
    check_thought_tokens(tokenizer, marks, path)
    model = CodiModel(load_model(str(path), dtype=dtype), marks.latent, shape)
    model.load_extra(Path(path))
    if device is not None:
        model = model.to(device)
    model.eval()
    return ThoughtPredictor(model.thought_lm(), tokenizer, cot_removed=math.inf, marks=marks, thoughts=thoughts)
