"""The request schema of the OpenAI-compatible server (serve.py): what a chat request may
hold, validated by pydantic, and the bounds the server enforces on it."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 8
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
MAX_SCALE = 1e3


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    scale: float | None = None

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and abs(v) <= MAX_SCALE):
            raise ValueError(f"must be a finite number with |scale| <= {MAX_SCALE:g}")
        return v


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    steering: Steering | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """Name a feature this server does not implement rather than silently ignore it."""
        if self.tools or self.functions:
            return "tool and function calling are not supported by this server"
        if self.logit_bias:
            return "logit_bias is not supported by this server"
        if self.frequency_penalty or self.presence_penalty:
            return "frequency_penalty and presence_penalty are not supported by this server"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format other than text is not supported by this server"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs requires logprobs: true"
        return None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return (f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))), (loc or None)
