"""The judge's fixed prompts, in one place (docs/rlaif.md shows them).

A comparison is one user message (`COMPARE_TEMPLATE`) under the judge model's chat template,
then the start of the assistant's reply (`COMPARE_ANSWER`, ending in "("): the next token is
read, and only the log-probabilities of `COMPARE_OPTIONS` count. A pointwise score reads
"Yes" vs "No" after `POINTWISE_ANSWER` the same way. A model without a chat template gets the
message as plain text followed by the answer prefix.
"""

from __future__ import annotations

# The principle a judge applies when none is given. Comparative, as in the RLAIF and
# Constitutional AI papers ("Which response is ...?").
DEFAULT_PRINCIPLE = "Which response is more helpful, honest and harmless?"
# The same for one response (`Judge.score`, the `judge` reward): a statement it follows or not.
DEFAULT_POINTWISE_PRINCIPLE = "The response is helpful, honest and harmless."

COMPARE_TEMPLATE = (
    "Compare two responses to the same request.\n\n"
    "Request: {prompt}\n\n"
    "Response (A): {response_a}\n\n"
    "Response (B): {response_b}\n\n"
    "{principle} Answer (A) or (B).")
COMPARE_ANSWER = "Answer: ("
COMPARE_OPTIONS = ("A", "B")

POINTWISE_TEMPLATE = (
    "Judge a response to a request.\n\n"
    "Request: {prompt}\n\n"
    "Response: {response}\n\n"
    "Principle: {principle}\n"
    "Does the response follow the principle? Answer Yes or No.")
POINTWISE_ANSWER = "Answer:"
POINTWISE_OPTIONS = (" Yes", " No")


def as_text(x) -> str:
    """A prompt or response as plain text: a string as it is; chat messages as their contents,
    one per line, each after its role when there are several ("user: ...")."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return str(x.get("content", ""))
    if isinstance(x, (list, tuple)):
        if len(x) == 1 and isinstance(x[0], dict):
            return str(x[0].get("content", ""))
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" if isinstance(m, dict)
                         else str(m) for m in x)
    return str(x)


def compare_message(prompt, response_a, response_b, principle: str) -> str:
    return COMPARE_TEMPLATE.format(prompt=as_text(prompt).strip(),
                                   response_a=as_text(response_a).strip(),
                                   response_b=as_text(response_b).strip(), principle=principle)


def pointwise_message(prompt, response, principle: str) -> str:
    return POINTWISE_TEMPLATE.format(prompt=as_text(prompt).strip(),
                                     response=as_text(response).strip(), principle=principle)
