"""Checks on every GenerateRequest field before anything reaches Redis."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gateway.errors import InvalidField
from protos.lorapool.v1 import generation_pb2

# Checked with fullmatch and anchored with `\A…\Z`: `$` would accept a trailing newline.
# `name` or `name:version`: no slashes, no leading dot, no `..` (never path-like).
ADAPTER_REF = re.compile(r"\A(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:[0-9]{1,9})?\Z")
REQUEST_ID = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")
SpecMethod = generation_pb2.SpeculativeOptions.Method
ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_chars: int = 65_536
    max_prompt_tokens: int = 8192
    max_messages: int = 256
    max_tokens: int = 4096
    default_max_tokens: int = 256
    max_stop: int = 16
    max_stop_chars: int = 256
    max_temperature: float = 100.0
    max_speculative_tokens: int = 16


def check_adapter_ref(ref: str, field: str = "adapter") -> None:
    if ref and not ADAPTER_REF.fullmatch(ref):
        raise InvalidField(field, "must be `name` or `name:version` (letters, digits, . _ -)")


def validate(request: generation_pb2.GenerateRequest, limits: RequestLimits) -> None:
    """Raise InvalidField naming the first bad field."""
    check_adapter_ref(request.adapter)
    if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
        raise InvalidField("request_id", "at most 128 of letters, digits and . _ : -")
    _check_prompt(request, limits)
    _check_sampling(request.sampling, limits)
    _check_speculative(request.speculative, limits)


def _check_speculative(spec: generation_pb2.SpeculativeOptions, limits: RequestLimits) -> None:
    """Range-check the options; any method (and the server's default) is served."""
    if spec.num_speculative_tokens > limits.max_speculative_tokens:
        raise InvalidField(
            "speculative.num_speculative_tokens", f"at most {limits.max_speculative_tokens}"
        )
    if spec.method not in SpecMethod.values():
        raise InvalidField("speculative.method", "unknown method")


def _check_prompt(request: generation_pb2.GenerateRequest, limits: RequestLimits) -> None:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidField("prompt", "one of text, chat or token_ids is required")
    if kind == "text":
        if not request.text.strip():
            raise InvalidField("text", "must not be empty")
        if len(request.text) > limits.max_prompt_chars:
            raise InvalidField("text", f"longer than {limits.max_prompt_chars} characters")
    elif kind == "chat":
        _check_chat(list(request.chat.messages), limits)
    elif not 0 < len(request.token_ids.ids) <= limits.max_prompt_tokens:
        raise InvalidField("token_ids.ids", f"1 to {limits.max_prompt_tokens} token ids")


def _check_chat(messages: list[generation_pb2.ChatMessage], limits: RequestLimits) -> None:
    if not 0 < len(messages) <= limits.max_messages:
        raise InvalidField("chat.messages", f"1 to {limits.max_messages} messages")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidField(f"chat.messages[{i}].role", f"one of {sorted(ROLES)}")
    if not any(m.content.strip() for m in messages):
        raise InvalidField("chat.messages", "all messages are empty")
    if sum(len(m.content) for m in messages) > limits.max_prompt_chars:
        raise InvalidField("chat.messages", f"longer than {limits.max_prompt_chars} characters")


def _check_sampling(sampling: generation_pb2.SamplingParams, limits: RequestLimits) -> None:
    if sampling.HasField("temperature"):
        t = sampling.temperature
        if not math.isfinite(t) or not 0 <= t <= limits.max_temperature:
            raise InvalidField(
                "sampling.temperature", f"a finite number in [0, {limits.max_temperature}]"
            )
    if sampling.HasField("top_p"):
        p = sampling.top_p
        if not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidField("sampling.top_p", "must be in (0, 1]")
    if sampling.HasField("max_tokens") and not 1 <= sampling.max_tokens <= limits.max_tokens:
        raise InvalidField("sampling.max_tokens", f"must be in [1, {limits.max_tokens}]")
    if len(sampling.stop) > limits.max_stop:
        raise InvalidField("sampling.stop", f"at most {limits.max_stop} stop strings")
    for i, stop in enumerate(sampling.stop):
        if not 0 < len(stop) <= limits.max_stop_chars:
            raise InvalidField(f"sampling.stop[{i}]", f"1 to {limits.max_stop_chars} characters")
