import hashlib

from icot.data.format import format_line, read_examples
from icot.data.mult import MultTask, mult_example, parse_operands, sample_splits
from conftest import run_cli


def test_regenerates_every_reference_line_byte_for_byte(reference):
    files = sorted((reference / "mult").glob("*.txt"))
    assert len(files) == 10
    for path in files:
        expected = path.read_bytes()
        lines = [format_line(mult_example(*parse_operands(ex.question))) for ex in read_examples(path)]
        assert ("\n".join(lines) + "\n").encode() == expected, path.name


def test_reference_checksums_match_the_shipped_list(reference):
    for line in (reference / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((reference / name).read_bytes()).hexdigest() == digest, name


def test_unequal_digit_counts_and_exact_widths():
    ex = mult_example(12, 345)
    assert ex.question == "2 1 * 5 4 3"
    assert ex.answer == " ".join(reversed(str(12 * 345).zfill(5)))
    task = MultTask.parse("2x3")
    pairs = sample_splits(task, {"train": 500}, seed=1)["train"]
    assert all(10 <= a <= 99 and 100 <= b <= 999 for a, b in pairs)


def test_cli_splits_are_disjoint_deterministic_and_exclude(tmp_path, reference):
    exclude = reference / "mult" / "4x4_test.txt"
    args = ["data", "mult", "--digits", "4x4", "--train", "3000", "--valid", "200", "--test", "200", "--seed", "5"]
    assert run_cli(*args, "--out", tmp_path / "a", "--exclude", exclude) == 0
    assert run_cli(*args, "--out", tmp_path / "b", "--exclude", exclude) == 0
    pairs = {}
    for split in ("train", "valid", "test"):
        a, b = (tmp_path / d / f"{split}.txt" for d in "ab")
        assert a.read_bytes() == b.read_bytes()
        pairs[split] = {parse_operands(e.question) for e in read_examples(a)}
    assert [len(pairs[s]) for s in ("train", "valid", "test")] == [3000, 200, 200]
    assert not pairs["train"] & pairs["valid"] and not pairs["train"] & pairs["test"] and not pairs["valid"] & pairs["test"]
    banned = {parse_operands(e.question) for e in read_examples(exclude)}
    assert not banned & (pairs["train"] | pairs["valid"] | pairs["test"])
    assert run_cli(*args[:-1], "6", "--out", tmp_path / "c") == 0
    assert (tmp_path / "c" / "train.txt").read_bytes() != (tmp_path / "a" / "train.txt").read_bytes()


def test_cli_refuses_to_overwrite_and_impossible_sizes(tmp_path, capsys):
    out = tmp_path / "d"
    assert run_cli("data", "mult", "--digits", "1x1", "--train", "10", "--valid", "5", "--test", "5", "--out", out) == 0
    assert run_cli("data", "mult", "--digits", "1x1", "--train", "10", "--valid", "5", "--test", "5", "--out", out) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert run_cli("data", "mult", "--digits", "1x1", "--train", "80", "--out", tmp_path / "e") == 2
    assert "only 81 distinct 1x1 operand pairs" in capsys.readouterr().err
    assert run_cli("data", "mult", "--digits", "4by4", "--out", tmp_path / "f") == 2
    assert "expected AxB" in capsys.readouterr().err


def test_exclude_file_with_non_digit_operand(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 * 3 4||x #### 1\n1 a * 3 4||x #### 1\n")
    assert run_cli("data", "mult", "--digits", "2x2", "--train", "5", "--out", tmp_path / "o", "--exclude", bad) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not a multiplication input" in err and len(err.strip().splitlines()) == 1
