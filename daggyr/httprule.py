"""google.api.http path templates, matched against raw request paths.

Matching works on the path as sent: segments are split on literal '/', a
literal ':verb' at the end selects the verb, and each segment is
percent-decoded only after matching, so '%2F' and '%3A' belong to a value
(as grpc-gateway reads them) and never to the route.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

__all__ = ["PathTemplate", "TemplateError"]

_VARIABLE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_.]*)(?:=(.*))?\}$")


class TemplateError(ValueError):
    """A path template this shim cannot serve."""


@dataclass(frozen=True)
class _Segment:
    literal: str | None = None  # a fixed segment
    variable: str | None = None  # field path bound here
    rest: bool = False  # '**': this and every following segment


@dataclass(frozen=True)
class PathTemplate:
    """One parsed template such as ``/api/v1/task/{task_id=**}:cancel``."""

    text: str
    segments: tuple[_Segment, ...]
    verb: str

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        if not text.startswith("/"):
            raise TemplateError(f"template {text!r} must start with '/'")
        body, verb = text, ""
        last_slash = text.rfind("/")
        brace_close = text.rfind("}")
        colon = text.rfind(":")
        if colon > last_slash and colon > brace_close:
            body, verb = text[:colon], text[colon + 1 :]
        parts = _split_template(body[1:])
        segments = []
        for index, part in enumerate(parts):
            match = _VARIABLE.match(part)
            if not match:
                if "{" in part or "*" in part:
                    raise TemplateError(f"template {text!r}: unsupported {part!r}")
                segments.append(_Segment(literal=part))
                continue
            name, pattern = match.group(1), match.group(2) or "*"
            if pattern == "**":
                if index != len(parts) - 1:
                    raise TemplateError(f"template {text!r}: '**' must come last")
                segments.append(_Segment(variable=name, rest=True))
            elif pattern == "*":
                segments.append(_Segment(variable=name))
            else:
                raise TemplateError(f"template {text!r}: unsupported {pattern!r}")
        return cls(text, tuple(segments), verb)

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The variables bound by ``raw_path`` (no query), or None.

        Raises UnicodeDecodeError when a matched value is not UTF-8.
        """
        if self.verb:
            suffix = ":" + self.verb
            if not raw_path.endswith(suffix):
                return None
            raw_path = raw_path[: -len(suffix)]
        if not raw_path.startswith("/"):
            return None
        parts = raw_path[1:].split("/")
        bound: dict[str, str] = {}
        for index, segment in enumerate(self.segments):
            if segment.rest:
                # '**' binds one or more segments here, so that the bare
                # collection path never doubles as an empty id.
                if index >= len(parts):
                    return None
                assert segment.variable is not None
                bound[segment.variable] = "/".join(
                    urllib.parse.unquote(p, errors="strict") for p in parts[index:]
                )
                return bound
            if index >= len(parts):
                return None
            if segment.literal is not None:
                if parts[index] != segment.literal:
                    return None
            else:
                assert segment.variable is not None
                bound[segment.variable] = urllib.parse.unquote(
                    parts[index], errors="strict"
                )
        return bound if len(parts) == len(self.segments) else None


def _split_template(body: str) -> list[str]:
    """Split on '/' outside braces, so '{a=x/*}' stays one piece."""
    parts, depth, current = [], 0, ""
    for char in body:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "/" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts
