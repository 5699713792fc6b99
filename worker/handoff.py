"""What the compute thread and the stage threads hand the socket thread: one message per batch.

A batch's answers travel over the inproc pipe as ``[RESULT, count, link, packed headers, *data
frames]``, where the packed headers are exactly the first frame of a framing-2 REPLY (a msgpack
list of each answer's packed header, ``envelope.packed_reply_frames``). Why: the socket thread then
receives a few frames per batch instead of one per answer, and sends a turn's single part on to a
framing-2 master as it came, without splitting the headers out of frames and packing them again
(the profile of the batched MLP put that hand-over at a fifth of the socket thread's time).
"""
from __future__ import annotations

from typing import Sequence

from ringserve.protocol.codec import pack
from ringserve.protocol.envelope import packed_reply_frames

RESULT = b"R"  # [RESULT, count, link, packed headers, *data frames]: `count` answers for master `link`
CHANGED = b"S"  # [CHANGED]: model state changed (new version): heartbeat now


def result_frames(link: int, replies: Sequence[tuple[dict, Sequence]]) -> list:
    """[(reply header, out-of-line frames)] for one master -> the RESULT message's frames."""
    data = [f for _, frames in replies for f in frames]
    return [RESULT, str(len(replies)).encode(), str(link).encode(),
            *packed_reply_frames([pack(header) for header, _ in replies], data)]
