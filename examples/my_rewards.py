"""A reward function for `llmkit finetune --method grpo --reward my_rewards:score` (run where this file is, or put
its folder on PYTHONPATH): 1 for the exact answer, 0.2 for an answer that contains it, 0 otherwise."""


def score(prompt: str, completion: str, answer: str | None = None) -> float:
    text = completion.strip()
    if answer is None:
        return 0.0
    if text == answer:
        return 1.0
    return 0.2 if answer in text else 0.0
