"""The functions icot's lm-eval task YAMLs name (`!function utils.NAME`); the work is in icot.lm_eval."""

from datasets import Dataset, DatasetDict

from icot.lm_eval import answer_correct, task_examples


def load_data(data_file=None, **metadata) -> DatasetDict:
    """The task's data file as its test split (lm-eval passes the task's metadata along, unused)."""
    rows = [{"question": e.question, "cot": e.cot, "answer": e.answer} for e in task_examples(data_file)]
    return DatasetDict({"test": Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the answer after `####`, as icot eval compares answers."""
    return {"exact_match": float(answer_correct(results[0], doc["answer"]))}
