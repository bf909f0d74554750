"""The three trainable ICoT-KD models, each a causal LM plus small modules that act at SEP.

- `MindReadingStudent` (stage a): per-layer MLP_l (H → 4H → ReLU → H) turns a thought z_l into
  the state that replaces the input of layer l at SEP.
- `ThoughtEmulator` (stage b): from its own state h_l at SEP it predicts ẑ_l = MLP_l([h_l; m_l])
  (m_l: mixture-component embedding), feeds ẑ_l through an LSTM with attention over its earlier
  outputs, and writes the result back at SEP before layer l runs. Two mixtures: `soft` (the
  released code: a softmax average of mixture_size learned components; one component for
  multiplication) and `token` (the paper's research code: one component per vocabulary token,
  the teacher's CoT token at t_l in training, the argmax of h_l·components at inference).
- `CoupledModel` (stage c): the emulator's ẑ_l go into the student instead of teacher states.

Each module's `forward(**lm_inputs)` is its LM's plain forward, so it runs like any model in
evaluation and generation; thoughts enter through forward pre-hooks on the decoder layers.

Saved form: the LM as a plain Hugging Face directory (`from_pretrained` loads it), the extra
modules beside it in `kd_modules.safetensors`; a coupled model is the student's directory with
the emulator's directory inside it as `emulator/`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from icot.errors import UserError
from icot.methods.kd.states import replaced_at
from icot.models import LMWithModules, lm_shape, load_model, read_metadata, replace_dir

MODULES_FILE = "kd_modules.safetensors"
EMULATOR_DIR = "emulator"
SOFT, TOKEN = "soft", "token"
MIXTURES = (SOFT, TOKEN)


def _mlp(inputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, hidden))


class _WithLM(LMWithModules):
    """A causal LM plus ICoT-KD modules, saved beside it in kd_modules.safetensors."""

    modules_file = MODULES_FILE
    kind = "ICoT-KD"


class MindReadingStudent(_WithLM):
    """Stage (a): an LM that reads a thought z_l at SEP in every layer l, through MLP_l."""

    def __init__(self, lm):
        super().__init__(lm)
        self.thought_mlps = nn.ModuleList(_mlp(self.hidden_size, self.hidden_size) for _ in range(self.num_layers))
        self.thought_mlps.to(device=lm.device, dtype=lm.dtype)

    def forward(self, thoughts=None, thoughts_at=None, **lm_inputs):
        """The LM's forward; with `thoughts` [batch, layers, hidden], read at `thoughts_at`."""
        if thoughts is None:
            return self.lm(**lm_inputs)
        with self.reading(thoughts, thoughts_at):
            return self.lm(**lm_inputs)

    def reading(self, thoughts: torch.Tensor, positions: torch.Tensor):
        """Context: the input of layer l at `positions` is replaced by MLP_l(thoughts[:, l])."""
        thoughts = thoughts.to(self.lm.dtype)
        return replaced_at(self.lm, positions, lambda l, current: self.thought_mlps[l](thoughts[:, l]))


class _EmulatorRun:
    """The emulator's state across the layers of one forward pass: LSTM state, attention keys."""

    def __init__(self, emulator: "ThoughtEmulator", cot_tokens: torch.Tensor | None):
        self.emulator = emulator
        self.cot_tokens = cot_tokens
        self.lstm_state = None
        self.keys: list[torch.Tensor] = []
        self.context = None
        self.thoughts: list[torch.Tensor] = []
        self.token_logits: list[torch.Tensor] = []

    def step(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """ẑ_l from h_l (collected as the emulated thought), then the state written back at SEP."""
        em = self.emulator
        forced = None if self.cot_tokens is None else self.cot_tokens[:, layer]
        component, logits = em.mixture_embedding(h, forced)
        if logits is not None:
            self.token_logits.append(logits)
        thought = em.thought_mlps[layer](torch.cat([h, component], dim=-1))
        self.thoughts.append(thought)
        if self.context is None:
            self.context = torch.zeros_like(thought)
        output, self.lstm_state = em.lstm((thought + self.context)[None], self.lstm_state)
        output = output[0]
        key = em.key_proj(output)
        if self.keys:
            # attend from this step to the keys of the earlier steps (they also serve as values)
            past = torch.stack(self.keys, dim=1)  # batch, steps, hidden
            weights = torch.softmax(torch.einsum("bsh,bh->bs", past, em.query_proj(output)), dim=1)
            self.context = torch.einsum("bs,bsh->bh", weights, past)
        self.keys.append(key)
        return em.out_proj(torch.cat([output, self.context], dim=-1))


class ThoughtEmulator(_WithLM):
    """Stage (b): an LM that, reading `input SEP`, emulates the teacher's thoughts ẑ_1..ẑ_L at SEP."""

    def __init__(self, lm, mixture_size: int = 1, softmax_temperature: float = 0.05, mixture: str = SOFT):
        super().__init__(lm)
        h = self.hidden_size
        self.mixture = mixture
        self.softmax_temperature = softmax_temperature
        if mixture == TOKEN:
            mixture_size = lm.get_input_embeddings().num_embeddings
        self.thought_mlps = nn.ModuleList(_mlp(2 * h, h) for _ in range(self.num_layers))
        self.mixture_components = nn.Embedding(mixture_size, h)
        self.lstm = nn.LSTM(input_size=h, hidden_size=h, num_layers=1)
        self.key_proj = nn.Linear(h, h)
        self.query_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(2 * h, h)
        for module in self.children():
            if module is not lm:
                module.to(device=lm.device, dtype=lm.dtype)

    @property
    def mixture_size(self) -> int:
        return self.mixture_components.num_embeddings

    def mixture_embedding(self, h: torch.Tensor, forced: torch.Tensor | None = None):
        """(m_l, token logits h·c_k or None).

        soft: the single component, or the components averaged by softmax(h·c_k / temperature).
        token: the component of the `forced` token (the teacher's, in training), else of the argmax.
        """
        weight = self.mixture_components.weight
        if self.mixture == TOKEN:
            logits = h @ weight.T
            chosen = logits.argmax(dim=-1) if forced is None else forced
            return self.mixture_components(chosen), logits
        if self.mixture_size == 1:
            return weight.expand(len(h), -1), None
        probs = torch.softmax(h @ weight.T / self.softmax_temperature, dim=-1)
        return probs @ weight, None

    def emulate(self, input_ids, attention_mask, position_ids, positions, cot_tokens=None):
        """(emulated thoughts [batch, layers, hidden], token logits [batch, layers, vocab] or None)
        of prompts whose SEP is at `positions`; `cot_tokens` [batch, layers] forces the token
        mixture's components (teacher forcing).

        Only the columns up to the last SEP are run, through the LM without its head.
        """
        width = int(positions.max()) + 1
        run = _EmulatorRun(self, cot_tokens)
        with replaced_at(self.lm, positions, run.step):
            self.lm.base_model(input_ids=input_ids[:, :width], attention_mask=attention_mask[:, :width],
                               position_ids=position_ids[:, :width], use_cache=False)
        logits = torch.stack(run.token_logits, dim=1) if run.token_logits else None
        return torch.stack(run.thoughts, dim=1), logits

    def forward(self, input_ids, attention_mask, position_ids, positions) -> torch.Tensor:
        """Emulated thoughts [batch, layers, hidden], as at inference."""
        return self.emulate(input_ids, attention_mask, position_ids, positions)[0]


class CoupledModel(nn.Module):
    """Stage (c): the emulator thinks at SEP, the student reads its thoughts and answers."""

    def __init__(self, emulator: ThoughtEmulator, student: MindReadingStudent):
        super().__init__()
        self.emulator = emulator
        self.student = student

    @property
    def config(self):
        return self.student.config

    def forward(self, thoughts_at=None, **lm_inputs):
        """The student LM's forward; with `thoughts_at`, emulate and read thoughts at those positions."""
        if thoughts_at is None:
            return self.student(**lm_inputs)
        with self.thinking(lm_inputs["input_ids"], lm_inputs["attention_mask"], lm_inputs["position_ids"], thoughts_at):
            return self.student(**lm_inputs)

    @contextmanager
    def thinking(self, input_ids, attention_mask, position_ids, positions):
        """Context in which the student reads the emulator's thoughts about these prompts at SEP."""
        thoughts = self.emulator(input_ids, attention_mask, position_ids, positions)
        with self.student.reading(thoughts, positions):
            yield

    def save(self, tokenizer, out: Path, metadata: dict, emulator_metadata: dict) -> None:
        """The student's directory with the emulator's inside it, swapped in whole."""
        tmp = out.with_name(out.name + ".kd-tmp")
        self.student.write(tokenizer, tmp, metadata)
        self.emulator.write(tokenizer, tmp / EMULATOR_DIR, emulator_metadata)
        replace_dir(tmp, out)


# ----- loading ---------------------------------------------------------------------------------

def kd_metadata(path, stage: str, what: str) -> dict:
    """icot.json of a saved ICoT-KD model of the given stage; a clear error for anything else."""
    meta = read_metadata(path)
    found = meta.get("kd_stage") if meta.get("method") == "kd" else meta.get("method")
    if found != stage:
        raise UserError(f"{what} {path}: not an ICoT-KD {stage} (its icot.json says {found or 'nothing'})")
    return meta


def check_cot_teacher(path) -> None:
    """A teacher's states are read over the CoT it writes: refuse a model whose icot.json says it was
    trained without (part of) its CoT or thinks in continuous thoughts instead."""
    meta = read_metadata(path)
    removed, thoughts = meta.get("cot_removed", 0), meta.get("thoughts", 0)
    if removed or thoughts:
        how = f"{thoughts} continuous thoughts in place of CoT steps" if thoughts else f"{removed} CoT tokens removed"
        raise UserError(f"teacher_dir {path}: a {meta.get('method')} model trained with {how} (its icot.json); an "
                        "ICoT-KD teacher writes its whole CoT: expected an explicit-CoT model (--method explicit)")


def load_student(path, dtype=None) -> MindReadingStudent:
    path = Path(path)
    kd_metadata(path, "student", "student_dir")
    student = MindReadingStudent(load_model(str(path), dtype=dtype))
    student.load_extra(path)
    return student


def load_emulator(path, dtype=None) -> ThoughtEmulator:
    path = Path(path)
    meta = kd_metadata(path, "emulator", "emulator_dir")
    emulator = ThoughtEmulator(load_model(str(path), dtype=dtype), meta["mixture_size"], meta["softmax_temperature"],
                               meta.get("mixture", SOFT))  # icot 0.1 emulators: soft
    emulator.load_extra(path)
    return emulator


def load_coupled(path, dtype=None) -> CoupledModel:
    path = Path(path)
    student = MindReadingStudent(load_model(str(path), dtype=dtype))
    student.load_extra(path)
    return CoupledModel(load_emulator(path / EMULATOR_DIR, dtype), student)


def check_same_shape(reference, reference_name: str, other, other_name: str) -> None:
    """Teacher, student and emulator exchange states layer by layer: same depth and width."""
    if lm_shape(reference) != lm_shape(other):
        (l1, h1), (l2, h2) = lm_shape(reference), lm_shape(other)
        raise UserError(f"{other_name} has {l2} layers of width {h2} but {reference_name} has {l1} of width {h1}; "
                        "ICoT-KD needs the same number of layers and hidden size")
    if reference.get_input_embeddings().num_embeddings != other.get_input_embeddings().num_embeddings:
        raise UserError(f"{other_name} and {reference_name} have different vocabularies; they must share the teacher's tokenizer")
