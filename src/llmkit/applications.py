"""The applications of a chat model the course covers, as prompt templates anyone can read and edit: the same presets
drive `llmkit generate --task ...` and the web page's Applications tab (served at GET /applications).

    assistant   a helpful assistant (the text is the message)
    summarize   a few faithful sentences
    translate   into a target language (--to fr, de, es, ...)
    explain     like a teacher: step by step, with an example
    write       a story, an email or a product text about the text (--kind)
    sentiment   positive, negative or neutral, in one word

A template is a system message and a user message with `{text}` (and `{language}` / `{kind}`) in it.
"""

from __future__ import annotations

from llmkit.errors import LlmkitError

LANGUAGES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "zh": "Chinese",
    "ja": "Japanese",
    "ru": "Russian",
}
KINDS = {"story": "a short story", "email": "a polite email", "product": "a product description"}

PRESETS: dict[str, dict] = {
    "assistant": {
        "title": "Assistant",
        "system": "You are a helpful, honest assistant.",
        "user": "{text}",
        "max_tokens": 256,
        "placeholder": "Ask anything.",
    },
    "summarize": {
        "title": "Summarize",
        "system": "You summarize texts faithfully, without adding anything.",
        "user": "Summarize the following text in two or three sentences.\n\n{text}",
        "max_tokens": 160,
        "placeholder": "Paste a text to summarize.",
    },
    "translate": {
        "title": "Translate",
        "system": "You are a careful translator.",
        "user": "Translate the following text into {language}. Answer with the translation only.\n\n{text}",
        "max_tokens": 200,
        "options": {"to": LANGUAGES},
        "defaults": {"to": "fr"},
        "placeholder": "A text to translate.",
    },
    "explain": {
        "title": "Explain like a teacher",
        "system": "You are a patient teacher who explains simply.",
        "user": "Explain the following to a curious student, step by step, with one simple example.\n\n{text}",
        "max_tokens": 256,
        "placeholder": "A concept, e.g. photosynthesis.",
    },
    "write": {
        "title": "Write",
        "system": "You are a skilled writer.",
        "user": "Write {kind} about the following.\n\n{text}",
        "max_tokens": 256,
        "options": {"kind": KINDS},
        "defaults": {"kind": "story"},
        "placeholder": "What to write about.",
    },
    "sentiment": {
        "title": "Classify sentiment",
        "system": "You are a sentiment classifier. You answer with one word: positive, negative or neutral.",
        "user": "Text: {text}\n\nSentiment:",
        "max_tokens": 8,
        "placeholder": "A review or a message.",
    },
}


def render(task: str, text: str, **options: str | None) -> list[dict]:
    """The chat messages of `task` applied to `text` ([system, user]); options: to (a language code or name), kind."""
    if task not in PRESETS:
        raise LlmkitError(f"unknown task {task!r}", f"use one of: {', '.join(PRESETS)}")
    if not text.strip():
        raise LlmkitError("the text is empty", "give the task a text (--prompt, --file or standard input)")
    preset = PRESETS[task]
    values = {**preset.get("defaults", {}), **{k: v for k, v in options.items() if v}}
    fields = {"text": text.strip()}
    if "to" in preset.get("options", {}):
        to = values["to"]
        fields["language"] = LANGUAGES.get(to.lower(), to if to[:1].isupper() or len(to) > 3 else None) or ""
        if not fields["language"]:
            raise LlmkitError(f"unknown language {to!r}", f"use a code ({', '.join(LANGUAGES)}) or a language's name")
    if "kind" in preset.get("options", {}):
        kind = values["kind"]
        if kind not in KINDS:
            raise LlmkitError(f"unknown kind {kind!r}", f"use one of: {', '.join(KINDS)}")
        fields["kind"] = KINDS[kind]
    return [{"role": "system", "content": preset["system"]}, {"role": "user", "content": preset["user"].format(**fields)}]


def presets_json() -> dict:
    """The presets for the web page (the same templates the command line uses)."""
    return {"presets": PRESETS, "languages": LANGUAGES, "kinds": KINDS}
