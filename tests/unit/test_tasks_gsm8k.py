"""GSM8K loader: a local JSONL file in the GSM8K format, a hash-bucket split, numeric answer matching.

The sample records are written by the tests (GSM8K-style, made up here); nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from fractions import Fraction

import pytest

from aisrl.tasks import get_task, problem_from_json, problem_to_json
from aisrl.tasks.gsm8k import final_answer, parse_number

SAMPLE = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A shop sells 1,250 pens a day. How many pens does it sell in 4 days?",
        "answer": "It sells 1,250*4 = <<1250*4=5000>>5,000 pens.\n#### 5,000",
    },
    {
        "question": "Tim has $3.50 and spends $1.25. How much is left?",
        "answer": "3.50-1.25=<<3.5-1.25=2.25>>2.25\n#### 2.25",
    },
    {"question": "It is 5 degrees and drops by 8. What is the temperature now?", "answer": "5-8=-3\n#### -3"},
]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def sample_file(tmp_path):
    generated = [
        {"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
         "answer": f"He has {i}+{i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2:,}"}
        for i in range(1, 300)
    ]  # fmt: skip
    return _write(tmp_path / "gsm8k.jsonl", SAMPLE + generated)


def test_loader_split_and_references(sample_file):
    task = get_task("gsm8k", path=str(sample_file))
    assert task.multiline_answers is True
    assert len(task.train) + len(task.eval) == 303
    assert 10 <= len(task.eval) <= 60  # about 10% held out
    held_out = task.eval_split(len(task.eval))
    assert held_out == get_task("gsm8k", path=str(sample_file)).eval_split(len(task.eval))
    assert task.eval_split(3) == held_out[:3]
    train = [task.train_problem(0, i) for i in range(len(task.train))]
    assert len({p.uid for p in train}) == len(task.train)  # one epoch visits every training record once
    assert not {p.prompt for p in held_out} & {p.prompt for p in train}
    assert all(p.uid.startswith("gsm8k/eval/") for p in held_out)
    assert all(p.uid.startswith("gsm8k/train/") for p in train)
    assert task.train_problem(0, 5) == task.train_problem(0, 5)
    assert [task.train_problem(1, i).uid for i in range(20)] != [task.train_problem(2, i).uid for i in range(20)]
    assert task.train_problem(0, len(task.train)).uid in {p.uid for p in train}  # the second epoch
    for problem in train + held_out:
        assert task.verify(problem, problem.reference) == 1.0
        assert problem_from_json(problem_to_json(problem)) == problem
        assert problem.prompt.startswith("Q: ") and problem.prompt.endswith("?\nA:")
        assert "<<" not in problem.reference and problem.reference.startswith(" ")
    with pytest.raises(ValueError, match="asked for"):
        task.eval_split(len(task.eval) + 1)


def test_first_record_in_detail(tmp_path):
    task = get_task("gsm8k", path=str(_write(tmp_path / "one.jsonl", SAMPLE * 1)), eval_fraction=0.001)
    natalia = next(p for p in task.train + task.eval if p.uid.endswith("/000001"))
    assert natalia.prompt == f"Q: {SAMPLE[0]['question']}\nA:"
    assert natalia.reference == (
        " Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert natalia.data == {"answer": "72"}
    kept = get_task("gsm8k", path=str(tmp_path / "one.jsonl"), eval_fraction=0.001, keep_calculator=True)
    assert "<<48/2=24>>" in next(p for p in kept.train + kept.eval if p.uid.endswith("/000001")).reference
    answers = {p.uid[-1]: p.data["answer"] for p in task.train + task.eval}
    assert answers == {"1": "72", "2": "5000", "3": "9/4", "4": "-3"}


def test_verifier_reads_the_final_answer(tmp_path):
    task = get_task("gsm8k", path=str(_write(tmp_path / "s.jsonl", SAMPLE)), eval_fraction=0.001)
    by_answer = {p.data["answer"]: p for p in task.train + task.eval}
    pens, money, cold = by_answer["5000"], by_answer["9/4"], by_answer["-3"]
    for right in (
        "#### 5000",
        "#### 5,000",
        "#### $5,000.",
        "#### 5000.0",
        " It sells 1,250*4 pens.\n#### 5000\n",
        "He sells 1250 a day, so 5,000 in total.",  # no ####: the last number
        "#### 12\nWait, that is wrong.\n#### 5000 pens",  # the last ####
        "4 days, so\n5000",
    ):
        assert task.verify(pens, right) == 1.0, right
    for wrong in ("#### 5001", "#### 50,00", "5000 pens in 4 days", "#### 500 0", "####", "#### five thousand",
                  "# 5000 then 4", "", "no idea", "9" * 100000, "#### " + "9" * 50):  # fmt: skip
        assert task.verify(pens, wrong) == 0.0, wrong
    assert task.verify(money, "#### 2.25") == 1.0
    assert task.verify(money, "#### $2.250") == 1.0
    assert task.verify(money, "#### 2.2") == 0.0
    assert task.verify(cold, "5-8=-3\n#### -3") == 1.0
    assert task.verify(cold, "#### 3") == 0.0
    assert task.extract_answer(" a\nb ") == "a\nb"


def test_hostile_output_scores_zero_fast(tmp_path):
    task = get_task("gsm8k", path=str(_write(tmp_path / "s.jsonl", SAMPLE)), eval_fraction=0.001)
    problem = task.train[0]
    hostile = ["", "\x00", "🙂" * 1000, "1," * 9000, "1," * 10**5, "####" * 4000, "9" * 10**6, "1." * 9000, "9" * 19000]
    for answer in [*hostile, None]:
        start = time.perf_counter()
        assert task.verify(problem, answer) == 0.0  # type: ignore[arg-type]
        assert time.perf_counter() - start < 1.0  # a guard against pathological parsing, not a benchmark


def test_number_parsing():
    assert parse_number(" 1,234 ") == 1234
    assert parse_number("$1,234.50") == Fraction(246900, 200)
    assert parse_number("42.") == 42
    assert parse_number("-7") == -7
    for bad in ("1,2,3", "12,34", "", "abc", "1e5", "٣", "9" * 40):
        assert parse_number(bad) is None, bad
    assert final_answer("1,2,3") == 3  # commas count only as thousands separators
    assert final_answer("so 12,345,678 then") == 12345678
    assert final_answer(None) is None  # type: ignore[arg-type]


def test_loader_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        get_task("gsm8k", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="path"):
        get_task("gsm8k")
    good = json.dumps({"question": "q?", "answer": "#### 1"})
    cases = [
        (good + "\n{oops\n", r"bad\.jsonl:2: not valid JSON"),
        (good + "\n\n[1, 2]\n", r":3: a record must be a JSON object"),
        (json.dumps({"question": "q", "answer": "42"}), r":1: 'answer' must be a string ending in '#### <number>'"),
        (json.dumps({"question": "q", "answer": "#### forty"}), r":1: the text after '####' is not a number"),
        (json.dumps({"question": "", "answer": "#### 1"}), r":1: 'question' must be a non-empty string"),
        (json.dumps({"answer": "#### 1"}), r":1: 'question'"),
        (json.dumps({"question": "q", "answer": 1}), r":1: 'answer' must be a string"),
        ("\n\n", "no training records"),
    ]
    for text, message in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            get_task("gsm8k", path=str(bad))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        get_task("gsm8k", path=str(tmp_path / "latin1.jsonl"))
    with pytest.raises(ValueError, match="eval_fraction"):
        get_task("gsm8k", path=str(tmp_path / "latin1.jsonl"), eval_fraction=1.0)
