"""The versioned judge prompt (src/refusalkit/data/judge/prompt_vN.txt), split into sections.

The file keeps every word the judges send in one reviewed place. Sections (`=== NAME ===`):
INSTRUCTIONS (shared by every item, so the local judge caches its keys/values once), ITEM
(with {prompt} and {response}), LABEL QUESTION / LABEL PREFIX (the local judge reads the
label token right after the prefix), STYLE QUESTION / STYLE PREFIX (the local style pass),
REMOTE QUESTION (what a remote chat model is asked; it answers in text).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from refusalkit.errors import UserError

DEFAULT_VERSION = "v1"
MAX_RESPONSE_CHARS = 2000  # long answers are judged on their start; refusals show early


@dataclass(frozen=True)
class JudgePrompt:
    version: str
    sections: dict[str, str]
    digest: str

    def section(self, name: str) -> str:
        return self.sections[name]

    def item(self, prompt: str, response: str) -> str:
        """The item block; braces in user text are safe because we substitute, not format."""
        text = response.strip()[:MAX_RESPONSE_CHARS] or "(empty response)"
        return (self.sections["ITEM"].replace("{prompt}", prompt.strip())
                .replace("{response}", text))

    def remote_message(self, prompt: str, response: str) -> str:
        return "\n".join([self.sections["INSTRUCTIONS"], self.item(prompt, response),
                          self.sections["REMOTE QUESTION"]])


def load_prompt(version: str = DEFAULT_VERSION) -> JudgePrompt:
    """Read prompt_<version>.txt from the package data."""
    name = f"prompt_{version}.txt"
    try:
        text = resources.files("refusalkit").joinpath("data", "judge", name).read_text("utf-8")
    except FileNotFoundError:
        raise UserError(f"unknown judge prompt version '{version}' (no {name})") from None
    parts = re.split(r"^=== ([A-Z ]+) ===\n", text, flags=re.M)
    sections = {parts[i]: parts[i + 1].rstrip("\n") for i in range(1, len(parts) - 1, 2)}
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return JudgePrompt(version, sections, digest)
