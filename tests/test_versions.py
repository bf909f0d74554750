"""What keeps icot working across the transformers releases pyproject.toml claims (docs/RESULTS.md,
"Tested versions"; benchmarks/versions.sh runs these and the decoding tests at the lowest and newest):
saved tokenizers name a class every release loads, and no library warning reaches the terminal."""

import json
import os
import subprocess
import sys

from conftest import ROOT

from icot.data.tokenizers import load_tokenizer, save_tokenizer, word_tokenizer

MODELS = ("mult3x3-micro-stepwise", "mult4x4-tiny-stepwise")


def test_saved_tokenizers_name_a_class_transformers_4_and_5_both_load(tmp_path):
    """transformers 5 writes `TokenizersBackend`, unknown to 4.x; `PreTrainedTokenizerFast` is the same
    class in 5 and the fast tokenizer in 4.x. The shipped models' files say so too."""
    tokenizer = word_tokenizer(["1 2 * 3 4", "5 6"])
    save_tokenizer(tokenizer, tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"is_local", "local_files_only"} & set(saved)
    loaded = load_tokenizer(str(tmp_path / "tok"))
    text = "1 2 * 3 4 <|endoftext|> 7"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (0, 0, 1)
    for model in MODELS:
        assert json.loads((ROOT / "models" / model / "tokenizer_config.json").read_text())["tokenizer_class"] == \
            "PreTrainedTokenizerFast"


def test_predict_prints_no_library_warning():
    """Every warning shown (PYTHONWARNINGS=default also shows the deprecations Python hides): stderr
    stays empty, whatever the installed transformers and accelerate."""
    env = {**os.environ, "PYTHONWARNINGS": "default", "ICOT_TRACEBACK": "1"}
    done = subprocess.run([sys.executable, "-m", "icot.cli", "predict", "--model", str(ROOT / "models" / MODELS[1]),
                           "1234*5678"], capture_output=True, text=True, env=env, timeout=300)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "1234*5678 = 7006652  (correct)\n"
