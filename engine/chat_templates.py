"""The `chat_template` setting: a built-in name, a .jinja file, or an inline template (torch-free).

A tokenizer without a chat template cannot render conversational data; one with the wrong template
trains on a format the model was not taught. The setting overrides the tokenizer's own template for
the data, the rollouts and eval, and is saved with the final model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import SpecError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "presets" / "chat_templates"
BUILTIN = ("chatml", "llama3", "demo")
# A conversation every template must render, with the variables transformers passes.
_SAMPLE = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]


def is_inline(value: str) -> bool:
    return "{{" in value or "{%" in value


def template_path(value: str) -> Path | None:
    """The file a built-in name or a path names (None for an inline template)."""
    if is_inline(value):
        return None
    if value in BUILTIN:
        return TEMPLATES_DIR / f"{value}.jinja"
    return Path(value).expanduser()


def template_text(value: str) -> str:
    """The Jinja source of a `chat_template` value (a file's single trailing newline dropped)."""
    path = template_path(value)
    if path is None:
        return value
    text = path.read_text()
    return text[:-1] if text.endswith("\n") else text


def check_chat_template(value: str) -> str:
    """A `chat_template` value checked at submit: a file path made absolute; one that does not exist or a
    template that does not render a two-turn conversation is a SpecError naming the fix."""
    path = template_path(value)
    if path is not None and not path.is_file():
        raise SpecError(
            f"chat_template: '{value}' is not a built-in template ({', '.join(BUILTIN)}), an existing .jinja file, "
            "or an inline template (text with {{ ... }} or {% ... %})",
            "chat_template",
        )
    render_sample(template_text(value))
    return str(path.resolve()) if path is not None and value not in BUILTIN else value


def render_sample(source: str) -> str:
    """Render a two-turn conversation as transformers would (a sandboxed Jinja environment)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        rendered = environment.from_string(source).render(
            messages=_SAMPLE, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )
    except TemplateError as err:
        raise SpecError(f"chat_template does not render a conversation: {err}", "chat_template") from None
    if "2+2=" not in rendered or "4" not in rendered:
        raise SpecError("chat_template renders a conversation without its messages' content", "chat_template")
    return rendered
