"""An auxiliary running-sum loss for multiplication (Bai et al. 2025, arXiv 2510.00184).

Bai et al. find that a model which multiplies without CoT holds, at each answer digit, the
running column value ĉ_k = (digit products of column k) + ĉ_{k-1} // 10, and that linear
regression probes predicting ĉ_k, trained jointly as an auxiliary loss, let a 2-layer model learn
4x4 multiplication with no CoT at all. Two probes are offered (running_sum_probe):

- `heads`, theirs: one `Linear(d_head, 1)` without bias per attention head of decoder layer
  `running_sum_layer`, reading that head's output (the attention output before the output
  projection, split into heads). The loss is the squared error averaged over heads and labelled
  tokens: (1/H) Σ_h mean_i (z_h^i − ĉ_i)².
- `residual`, a variant: one `Linear(hidden, 1)` with bias on `hidden_states[layer + 1]` (for the
  last layer, the final norm's output), the squared error averaged over labelled tokens.

The labelled tokens (running_sum_positions): `answer`, Bai et al.'s, the answer digits, token c_k
labelled ĉ_k; `all` also every CoT digit, labelled with its own number's ĉ (data/mult.py:
running_values), and, with stepwise removal, the token before the removed span (the first SEP),
which takes the last removed token's position and is labelled with that token's ĉ: the value the
model must now hold inside.

Both regress ĉ / 10, so running_sum_weight w is Bai et al.'s λ = w / 100 on raw ĉ (their λ is not
published). The loss is added to the cross-entropy times running_sum_weight. The probe is saved
beside the model (running_sum_probe.safetensors); the model directory stays a plain Hugging Face one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from icot.config import changed, choice, option
from icot.data.batching import row_sources
from icot.data.layout import EncodedSet
from icot.data.mult import operand_digits, running_values
from icot.errors import UserError
from icot.models import LMWithModules, decoder_layers
from icot.trainer import Loss, TrainConfig

SCALE = 10.0  # ĉ / 10: the values reach ~350 on 4x4

# The attention output projection inside a decoder layer, by architecture: its input is the heads'
# outputs side by side, [batch, tokens, heads * d_head]
OUTPUT_PROJECTIONS = ("attn.c_proj",  # GPT-2
                      "self_attn.o_proj",  # Llama, Mistral, Qwen2, Phi-3, Gemma
                      "self_attn.dense",  # Phi
                      "self_attention.dense",  # Falcon
                      "attention.dense",  # GPT-NeoX
                      "attn.out_proj",  # GPT-J
                      "attn.attention.out_proj",  # GPT-Neo
                      "self_attn.out_proj")  # OPT


@dataclass
class RunningSumConfig(TrainConfig):
    """The running-sum loss's settings, for the methods that offer it (stepwise, nocot)."""

    running_sum_weight: float = option(0.0, help="not in the internalization papers: weight of Bai et al.'s auxiliary "
                                                 "running-sum loss on ĉ / 10 (methods/running_sum.py; their λ on raw "
                                                 "ĉ is this / 100); 0: off")
    running_sum_probe: str = choice("residual", "heads", default="residual",
                                    help="residual: one linear probe with bias on running_sum_layer's output (the "
                                         "variant); heads: Bai et al.'s, one linear probe without bias per attention "
                                         "head of running_sum_layer, on the head's output")
    running_sum_positions: str = choice("all", "answer", default="all",
                                        help="the tokens the probe is trained on: all, every CoT and answer digit "
                                             "a training row holds (with stepwise removal also the token before the "
                                             "gap; nocot rows hold the answer only); answer, the answer digits only "
                                             "(Bai et al.)")
    running_sum_layer: int = option(-1, help="the decoder layer the running-sum probe reads: its output (residual) or "
                                             "its attention heads' outputs (heads); -1: the last")

    def validate(self) -> None:
        super().validate()
        if not self.running_sum_weight >= 0:
            raise UserError(f"config: running_sum_weight must be >= 0, got {self.running_sum_weight}")
        for name in ("running_sum_probe", "running_sum_positions", "running_sum_layer"):
            if not self.running_sum_weight and changed(self, name):
                raise UserError(f"config: {name} {getattr(self, name)} is read only with running_sum_weight above 0; "
                                "drop it or set that")


class Probed(LMWithModules):
    """The LM and a method's probe on decoder layer `layer` (negative counts from the end)."""

    modules_file = "running_sum_probe.safetensors"
    kind = "running-sum probe"

    def __init__(self, lm, layer: int):
        super().__init__(lm)
        if not -self.num_layers <= layer < self.num_layers:
            raise UserError(f"config: running_sum_layer {layer} is not a layer of this {self.num_layers}-layer model "
                            f"(0 to {self.num_layers - 1}, or negative from the end)")
        self.layer = layer % self.num_layers


class ProbedLM(Probed):
    """One linear probe with bias on the output of decoder layer `layer` (`hidden_states[layer + 1]`)."""

    def __init__(self, lm, layer: int):
        super().__init__(lm, layer)
        self.probe = nn.Linear(self.hidden_size, 1).to(device=lm.device, dtype=lm.dtype)

    def forward(self, **inputs):
        """(the LM's output, the probe's ĉ / 10 at every position [batch, tokens])."""
        out = self.lm(**inputs, output_hidden_states=True)
        return out, self.probe(out.hidden_states[self.layer + 1]).squeeze(-1)


class HeadsProbedLM(Probed):
    """One linear probe without bias per attention head of decoder layer `layer`, each on its head's
    output: the input of the layer's attention output projection, split into heads."""

    def __init__(self, lm, layer: int):
        super().__init__(lm, layer)
        output_projection(decoder_layers(lm)[self.layer])  # a clear error now rather than at the first step
        self.num_heads = lm.config.num_attention_heads
        self.head_dim = getattr(lm.config, "head_dim", None) or self.hidden_size // self.num_heads
        self.probes = nn.ModuleList(nn.Linear(self.head_dim, 1, bias=False) for _ in range(self.num_heads))
        self.probes.to(device=lm.device, dtype=lm.dtype)

    def forward(self, **inputs):
        """(the LM's output, each head's probe's ĉ / 10 at every position [batch, tokens, heads])."""
        heads = []
        projection = output_projection(decoder_layers(self.lm)[self.layer])
        handle = projection.register_forward_pre_hook(lambda module, args: heads.append(args[0]))
        try:
            out = self.lm(**inputs)
        finally:
            handle.remove()
        if heads[0].shape[-1] != self.num_heads * self.head_dim:
            raise UserError(f"running_sum_probe heads: layer {self.layer}'s attention output has {heads[0].shape[-1]} "
                            f"features, not {self.num_heads} heads x {self.head_dim}")
        split = heads[0].unflatten(-1, (self.num_heads, self.head_dim))
        return out, torch.cat([probe(split[..., h, :]) for h, probe in enumerate(self.probes)], dim=-1)


def output_projection(layer: nn.Module) -> nn.Module:
    """The attention output projection of a decoder layer (OUTPUT_PROJECTIONS)."""
    modules = dict(layer.named_modules())
    found = next((modules[name] for name in OUTPUT_PROJECTIONS if name in modules), None)
    if found is None:
        raise UserError(f"running_sum_probe heads: no attention output projection ({', '.join(OUTPUT_PROJECTIONS)}) "
                        f"in {type(layer).__name__}, whose modules are {', '.join(n for n in modules if n)}; "
                        "use running_sum_probe residual")
    return found


class RunningSum:
    """A trainer's running-sum loss: the probed model, each training token's label, the loss term."""

    def __init__(self, config: RunningSumConfig):
        self.config = config
        self.values: np.ndarray | None = None  # ĉ / 10 of every training token (NaN: not labelled)

    def wrap(self, lm) -> Probed:
        probed = HeadsProbedLM if self.config.running_sum_probe == "heads" else ProbedLM
        return probed(lm, self.config.running_sum_layer)

    def label(self, data: EncodedSet) -> None:
        self.values = value_table(data, self.config.running_sum_positions)

    def batch_values(self, data: EncodedSet, batch: dict, drop_cot: bool = False) -> torch.Tensor:
        """The labels of the batch's tokens, laid out as collate lays out its rows."""
        return batch_values(self.values, data, batch["index"], drop_cot).to(batch["input_ids"].device)

    def loss(self, scores: tuple, predicted: torch.Tensor, values: torch.Tensor) -> Loss:
        """The cross-entropy's (loss_sum, correct, count) with the weighted probe term added."""
        loss_sum, correct, count = scores
        mse = probe_loss(predicted, values)  # of ĉ / 10; the loop divides the sum by the count
        return Loss(loss_sum + self.config.running_sum_weight * count * mse, correct, count,
                    {"running_sum_mse": mse.detach()})


def value_table(data: EncodedSet, positions: str = "all") -> np.ndarray:
    """ĉ / 10 for every token of `data` (flat, as data.tokens), NaN where there is none; with
    positions `answer` only the answer digits are labelled. Needs multiplication examples tokenized
    one token per CoT and answer word (space-separated digits: as our word-level tokenizer gives)."""
    values = np.full(len(data.tokens), np.nan, dtype=np.float16)
    for rows, a_digits, b_digits in _operands_by_shape(data):
        cot, answer = running_values(a_digits, b_digits)
        cot_start = data.offsets[rows] + data.n_prompt[rows]
        answer_start = cot_start + data.n_cot[rows] + 2  # after the SEP and `####`
        wrong = (data.n_cot[rows] != cot.shape[1]) | (data.offsets[rows + 1] - answer_start - 1 != answer.shape[1])
        if wrong.any():
            raise UserError(f"running_sum_weight: training example {rows[wrong][0] + 1} does not tokenize to one token "
                            "per digit; "
                            "the running-sum loss needs a tokenizer that gives each digit its own token (tokenizer: word does)")
        if positions == "all":
            values[cot_start[:, None] + np.arange(cot.shape[1])] = cot
        values[answer_start[:, None] + np.arange(answer.shape[1])] = answer
    return values / np.float16(SCALE)


def _operands_by_shape(data: EncodedSet):
    """(example indices, a's digits, b's digits) for each operand shape (digits of a, digits of b);
    a one-line error for an example that is not a multiplication."""
    groups: dict[tuple[int, int], tuple[list, list, list]] = {}
    examples = tqdm(data.examples, desc="running-sum labels", unit="ex", leave=False, disable=len(data) < 100_000)
    for i, example in enumerate(examples):
        try:
            a_digits, b_digits = operand_digits(example.question)
        except ValueError as err:
            raise UserError(f"running_sum_weight: training example {i + 1} is not a multiplication ({err}); "
                            "the running-sum loss is defined for `icot data mult` data only") from None
        rows, a_rows, b_rows = groups.setdefault((len(a_digits), len(b_digits)), ([], [], []))
        rows.append(i), a_rows.append(a_digits), b_rows.append(b_digits)
    return [(np.array(rows), np.array(a), np.array(b)) for rows, a, b in groups.values()]


def batch_values(table: np.ndarray, data: EncodedSet, indices: torch.Tensor, drop_cot: bool = False) -> torch.Tensor:
    """Rows of `table` for the batch's example indices, laid out as collate lays out their tokens
    (right-padded with NaN; with drop_cot, without the CoT)."""
    source, valid, _ = row_sources(data, indices.cpu().numpy(), drop_cot)
    values = np.where(valid, table[np.where(valid, source, 0)], np.nan)
    return torch.from_numpy(values.astype(np.float32))


def probe_loss(predicted: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labelled tokens (0 if none is labelled); `predicted` [batch,
    tokens] or, one prediction per head, [batch, tokens, heads]: then also averaged over heads."""
    labelled = ~torch.isnan(values)
    if not labelled.any():
        return predicted.sum() * 0.0
    target = values[labelled]
    chosen = predicted.float()[labelled]
    return (chosen - (target[:, None] if chosen.dim() == 2 else target)).pow(2).mean()
