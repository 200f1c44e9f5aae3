"""Capture of one output stream under a byte cap: the head and the tail are kept.

The reader keeps draining past the cap, so a task never blocks on a full pipe,
and what is stored never exceeds the cap however much the task prints.
"""

from __future__ import annotations

__all__ = ["CappedOutput"]


class CappedOutput:
    """Bytes of one stream: the first and last halves of the cap, and a count."""

    __slots__ = ("_head", "_head_limit", "_tail", "_tail_limit", "total")

    def __init__(self, limit: int) -> None:
        self._head_limit = limit - limit // 2
        self._tail_limit = limit // 2
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        """Take one chunk as read from the pipe."""
        self.total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
            if not data:
                return
        if len(data) >= self._tail_limit:
            self._tail[:] = data[len(data) - self._tail_limit :]
            return
        self._tail += data
        # Trim in batches, not on every chunk: the copy is paid once per tail.
        if len(self._tail) > 2 * self._tail_limit:
            del self._tail[: len(self._tail) - self._tail_limit]

    @property
    def truncated(self) -> bool:
        """True once more than the cap was fed."""
        return self.total > len(self._head) + min(len(self._tail), self._tail_limit)

    def text(self) -> str:
        """The kept bytes as UTF-8 text, with a marker where the middle was dropped.

        Invalid UTF-8 becomes U+FFFD, one per invalid sequence. A character cut
        by the cap at either edge of the gap is dropped whole and counted.
        """
        if not self.truncated:
            return (self._head + self._tail).decode("utf-8", "replace")
        head = bytes(self._head)
        tail = bytes(self._tail[-self._tail_limit :]) if self._tail_limit else b""
        head = head[: _complete_prefix(head)]
        tail = tail[_first_boundary(tail) :]
        dropped = self.total - len(head) - len(tail)
        marker = f"\n[daggyr: {dropped} bytes dropped]\n"
        return (
            head.decode("utf-8", "replace") + marker + tail.decode("utf-8", "replace")
        )


def _complete_prefix(data: bytes) -> int:
    """Length of ``data`` without a multi-byte character cut at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # lead byte: is its character complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


def _first_boundary(data: bytes) -> int:
    """Index of the first byte in ``data`` that is not a continuation byte."""
    for index in range(min(3, len(data))):
        if not 0x80 <= data[index] < 0xC0:
            return index
    return min(3, len(data))
