"""Bai et al.'s running-sum probe: one probe per attention head, on the answer digits, and answer-only
training with it (`--method nocot --running-sum-weight W --running-sum-probe heads`)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from icot.data.batching import collate
from icot.data.layout import Layout, encode
from icot.data.mult import parse_operands
from icot.data.tokenizers import word_tokenizer
from icot.errors import UserError
from icot.methods import running_sum
from icot.models import build_preset
from conftest import checked_eval, mult_examples, run_cli
from test_running_sum import bai_c_hats


@pytest.fixture(scope="module")
def mult3():
    examples = mult_examples(3, 3, 6, seed=3)
    tokenizer = word_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in examples])
    layout = Layout.for_tokenizer(tokenizer)
    return examples, tokenizer, layout, encode(tokenizer, layout, examples)


def gpt2_attention_by_hand(block, hidden: torch.Tensor) -> torch.Tensor:
    """The heads' outputs side by side [batch, tokens, heads * d_head] of a GPT-2 block on its input
    `hidden`: causal softmax(q k^T / sqrt(d_head)) v per head, computed here from the block's weights."""
    heads = block.attn.num_heads
    q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(hidden.shape[-1], dim=-1)
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # [batch, heads, tokens, d_head]
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, -math.inf).softmax(-1)
    return (weights @ v).transpose(1, 2).flatten(-2)


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_each_heads_probe_reads_its_heads_output_in_the_chosen_layer(mult3, layer):
    examples, tokenizer, layout, data = mult3
    torch.manual_seed(0)
    lm = build_preset("micro", len(tokenizer), tokenizer.eos_token_id).eval()
    probed = running_sum.HeadsProbedLM(lm, layer)
    ids = torch.as_tensor(data.row(0))[None, :].repeat(2, 1)
    ids[1] = ids[1].flip(0)  # two different rows, no padding
    with torch.no_grad():
        _, z = probed(input_ids=ids)
        hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[layer % 2]  # the block's input
        heads = gpt2_attention_by_hand(lm.transformer.h[layer], hidden)
    d_head = 128 // 4
    assert z.shape == (2, ids.shape[1], 4)
    expected = torch.stack([heads[..., h * d_head:(h + 1) * d_head] @ probed.probes[h].weight[0] for h in range(4)], -1)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4)


def test_one_bias_free_probe_of_d_head_per_head_and_llama_reads_its_o_proj_input(mult3):
    examples, tokenizer, layout, data = mult3
    torch.manual_seed(0)
    lm = build_preset("tiny-llama", len(tokenizer), tokenizer.eos_token_id).eval()
    probed = running_sum.HeadsProbedLM(lm, -1)
    assert [tuple(p.weight.shape) for p in probed.probes] == [(1, 64)] * 4
    assert all(p.bias is None for p in probed.probes)
    attention = lm.model.layers[1].self_attn
    with torch.no_grad():
        attention.o_proj.weight.copy_(torch.eye(256))  # the attention's output is then its heads' outputs
    seen = []
    attention.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    ids = torch.as_tensor(data.row(1))[None, :]
    with torch.no_grad():
        _, z = probed(input_ids=ids)
    expected = torch.stack([seen[0][..., h * 64:(h + 1) * 64] @ probed.probes[h].weight[0] for h in range(4)], -1)
    torch.testing.assert_close(z, expected)


def test_a_layer_without_a_known_output_projection_is_a_one_line_error():
    layer = torch.nn.ModuleDict({"mixer": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)})
    with pytest.raises(UserError, match="no attention output projection .* ModuleDict, whose modules are mixer, norm;"):
        running_sum.output_projection(layer)


def answer_positions(tokenizer, data, i) -> list[int]:
    """The answer digits' columns of example i's row: the tokens after `####`, before EOS."""
    words = tokenizer.convert_ids_to_tokens(data.row(i).tolist())
    start = words.index("####") + 1
    return list(range(start, len(words) - 1))


def test_answer_positions_label_the_answer_digits_only_with_bai_c_hats(mult3):
    examples, tokenizer, layout, data = mult3
    table = running_sum.value_table(data, "answer")
    whole = running_sum.value_table(data, "all")
    for i, example in enumerate(examples):
        row = table[data.offsets[i]:data.offsets[i + 1]]
        labelled = np.flatnonzero(~np.isnan(row)).tolist()
        assert labelled == answer_positions(tokenizer, data, i)
        expected = [c / 10 for c in bai_c_hats(*parse_operands(example.question))]
        np.testing.assert_allclose(row[labelled], expected, rtol=1e-3)
        assert np.count_nonzero(~np.isnan(whole[data.offsets[i]:data.offsets[i + 1]])) > len(labelled)  # all: more


def test_nocot_batches_carry_the_labels_on_their_own_answer_digits(mult3):
    examples, tokenizer, layout, data = mult3
    indices = np.array([4, 1, 2])
    batch = collate(data, indices, layout.pad_id, drop_cot=True)
    values = running_sum.batch_values(running_sum.value_table(data, "answer"), data, torch.as_tensor(indices), True)
    assert values.shape == batch["input_ids"].shape
    for r, i in enumerate(indices):
        words = tokenizer.convert_ids_to_tokens(batch["input_ids"][r].tolist())
        start = words.index("####") + 1
        digits = list(range(start, start + len(examples[i].answer.split())))
        assert np.flatnonzero(~torch.isnan(values[r]).numpy()).tolist() == digits
        assert [round(float(values[r, c]) * 10) % 10 for c in digits] == [int(words[c]) for c in digits]


def test_the_loss_is_bai_l_aux_averaged_over_heads_and_answer_digits(mult3):
    examples, tokenizer, layout, data = mult3
    torch.manual_seed(1)
    probed = running_sum.HeadsProbedLM(build_preset("micro", len(tokenizer), tokenizer.eos_token_id).eval(), -1)
    indices = np.arange(3)
    batch = collate(data, indices, layout.pad_id, drop_cot=True)
    values = running_sum.batch_values(running_sum.value_table(data, "answer"), data, torch.as_tensor(indices), True)
    with torch.no_grad():
        out, z = probed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # (1/H) Σ_h (1/N) Σ_i (z_h^i − ĉ_i / 10)², over the N answer digits of the batch, by hand
    terms = []
    for r, i in enumerate(indices):
        words = tokenizer.convert_ids_to_tokens(batch["input_ids"][r].tolist())
        start = words.index("####") + 1
        for k, c_hat in enumerate(bai_c_hats(*parse_operands(examples[i].question))):
            terms.append([(float(z[r, start + k, h]) - c_hat / 10) ** 2 for h in range(4)])
    by_hand = sum(sum(t) / 4 for t in terms) / len(terms)
    assert running_sum.probe_loss(z, values).item() == pytest.approx(by_hand, rel=1e-3)
    config = running_sum.RunningSumConfig(running_sum_weight=2.5)
    loss = running_sum.RunningSum(config).loss((torch.tensor(7.0), torch.tensor(3), torch.tensor(11)), z, values)
    assert loss.loss_sum.item() == pytest.approx(7.0 + 2.5 * 11 * by_hand, rel=1e-3)


def nocot(data, out, *extra) -> list[dict]:
    assert run_cli("train", "--method", "nocot", "--data", data, "--model", "micro", "--out", out, "--lr", "3e-3",
                   "--batch-size", "16", "--log-every", "2", "--max-steps", "12", "--running-sum-weight", "1",
                   *extra) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_nocot_with_the_heads_probe_trains_and_saves_the_probe_that_loads_back(mult3_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    records = nocot(mult3_data, tmp_path / "heads", "--running-sum-probe", "heads", "--running-sum-positions", "answer")
    mse = [r["running_sum_mse"] for r in records if "loss" in r]
    assert len(mse) == 6 and mse[-1] < mse[0]
    best = tmp_path / "heads" / "best"
    saved = load_file(best / "running_sum_probe.safetensors")
    assert sorted(saved) == [f"probes.{h}.weight" for h in range(4)]
    lm = AutoModelForCausalLM.from_pretrained(best)  # a plain Hugging Face model
    probed = running_sum.HeadsProbedLM(lm, -1)
    probed.load_extra(best)
    assert all(torch.equal(probed.probes[h].weight, saved[f"probes.{h}.weight"]) for h in range(4))
    with pytest.raises(UserError, match="does not match the model beside it"):
        running_sum.ProbedLM(lm, -1).load_extra(best)  # a residual probe is another file
    result = checked_eval(capsys, best, mult3_data / "test.txt", tmp_path / "eval.json")
    assert result["accuracy"] == records[-1]["test_accuracy"]


def test_nocot_without_the_probe_is_plain_answer_only_training(mult3_data, tmp_path):
    records = nocot(mult3_data, tmp_path / "plain", "--running-sum-weight", "0")
    assert not any("running_sum_mse" in r for r in records)
    assert not (tmp_path / "plain" / "best" / "running_sum_probe.safetensors").exists()


@pytest.mark.parametrize("method,args,fragment", [
    ("nocot", ["--running-sum-probe", "heads"], "running_sum_probe heads is read only with running_sum_weight above 0"),
    ("stepwise", ["--running-sum-positions", "answer"], "running_sum_positions answer is read only with"),
    ("nocot", ["--running-sum-weight", "1", "--running-sum-probe", "heads", "--running-sum-layer", "5"],
     "running_sum_layer 5 is not a layer of this 2-layer model"),
    ("nocot", ["--running-sum-weight", "1", "--running-sum-probe", "attention"], "running_sum_probe"),
])
def test_bad_heads_probe_settings_are_one_line_errors(mult3_data, tmp_path, capsys, method, args, fragment):
    from test_cli_errors import one_line_error

    line = one_line_error(capsys, run_cli("train", "--method", method, "--data", mult3_data, "--model", "micro",
                                          "--out", tmp_path / "r", *args))
    assert fragment in line


def test_with_gradient_checkpointing_the_heads_probe_gives_the_lm_the_same_gradients(mult3):
    from icot.adapters import enable_gradient_checkpointing

    examples, tokenizer, layout, data = mult3
    ids = torch.tensor([data.row(i).tolist() for i in range(len(data))])  # 3x3: every row is as long
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        probed = running_sum.HeadsProbedLM(build_preset("micro", len(tokenizer), tokenizer.eos_token_id), 0).train()
        if checkpointing:
            enable_gradient_checkpointing(probed, "micro")
        attention = probed.lm.transformer.h[0].attn
        seen = []
        attention.c_attn.register_forward_hook(lambda module, args, out: seen.append(1))
        _, z = probed(input_ids=ids, use_cache=False)
        z.pow(2).mean().backward()  # the probe's term alone: its gradient reaches layer 0 through the heads
        grads.append(attention.c_attn.weight.grad.clone())
        calls.append(len(seen))
    assert calls == [1, 2]  # checkpointing recomputes the layer in the backward pass
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
