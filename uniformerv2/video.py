"""Video decoding with PyAV: the frames a sampler asks for, from the keyframe before each where that pays.

Decoder choice: PyAV (``av``). Its wheels bundle FFmpeg, so it decodes (and, for the tests, encodes)
h264/mpeg4 with no system libraries; torchcodec needs the system FFmpeg shared libraries, and decord has
been unmaintained since 2022. A clip with several keyframes is decoded from the keyframe before a sampled
frame (``uniformerv2.reencode`` writes such clips), else sequentially; both give the same frames.
"""

from __future__ import annotations

import bisect
import functools

import torch


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or cannot supply the frames asked for (the message says why)."""


def _open(path):
    import av

    try:
        container = av.open(path)
    except Exception as exc:  # noqa: BLE001 - any FFmpeg/IO error means "unreadable"
        raise VideoDecodeError(f"cannot open: {type(exc).__name__}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("no video stream")
    return container


@functools.cache
def _rgb_options() -> dict:
    """Frame-to-RGB conversion on the calling thread. PyAV's default lets swscale start its own slice threads,
    and a DataLoader worker forked from a process that had converted frames before hung inside them; the
    DataLoader's workers are the parallelism here. PyAV before 14 takes no ``threads`` (and uses one)."""
    import av

    try:
        av.VideoFrame(2, 2, "rgb24").to_ndarray(format="rgb24", threads=1)
    except TypeError:
        return {"format": "rgb24"}
    return {"format": "rgb24", "threads": 1}


class _RGBFrames:
    """The wanted frames in RGB, each converted straight into its row of one uint8 (K, H, W, 3) tensor: one
    allocation per clip, and each converted frame's buffer is freed (and reused by the next) at once, where
    keeping K arrays to stack them touched fresh memory for each."""

    def __init__(self, count: int):
        self.count = count
        self.tensor: torch.Tensor | None = None

    def put(self, row: int, frame) -> None:
        rgb = frame.to_ndarray(**_rgb_options())
        if self.tensor is None:
            self.tensor = torch.empty((self.count, *rgb.shape), dtype=torch.uint8)
            self._rows = self.tensor.numpy()
        elif rgb.shape != self._rows.shape[1:]:
            raise VideoDecodeError(f"the frame size changes within the video: {self._rows.shape[1:]}, then "
                                   f"{rgb.shape}")
        self._rows[row] = rgb


def open_video_stream(path):
    """(container, its first video stream) with FFmpeg's frame and slice threads on."""
    container = _open(path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def count_frames(path: str) -> int:
    """Number of decodable frames (decodes the stream when the header does not say)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))
    except VideoDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise VideoDecodeError(f"decode failed: {type(exc).__name__}: {exc}") from exc
    finally:
        container.close()


def _packet_index(container, stream) -> tuple[list, list[int], list[int]] | None:
    """(the stream's packets in decode order, every frame's pts in display order, the keyframes' pts), from one
    pass of the demuxer (no decoding; the mp4 / webm demuxer reads ~1 ms per 10 s clip), or None when a packet
    has no pts. The packets are kept: decoding from a keyframe is then a decoder flush and a jump in the list
    (what a container seek leads to, without demuxing those packets a second time)."""
    packets, pts, keys = [], [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's final empty packet
            continue
        if packet.pts is None:
            return None
        packets.append(packet)
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    return packets, sorted(pts), sorted(keys)


# A seek restarts the decoder: about as costly as decoding this many frames (measured on the development
# machine with frame threads; an upper bound for the one-thread seeking decoder). A seek pays only where it skips more frames than that.
_SEEK_COST_FRAMES = 8


def _seek_plan(pts: list[int], keys: list[int], unique: list[int]) -> list[int | None] | None:
    """For each wanted frame (sorted display indices), the pts of the keyframe to seek to before decoding on to
    it, or None to continue from the last frame; None (the whole plan) where no keyframe precedes a wanted
    frame, or where the plan would not decode fewer frames than reading sequentially to the last one."""
    plan, decoded, position = [], 0, None
    for index in unique:
        k = bisect.bisect_right(keys, pts[index]) - 1
        if k < 0:
            return None
        key_index = bisect.bisect_left(pts, keys[k])
        seek = position is None or key_index - position - 1 > _SEEK_COST_FRAMES
        decoded += (index - key_index + 1 + _SEEK_COST_FRAMES) if seek else (index - position)
        plan.append(keys[k] if seek else None)
        position = index
    return plan if decoded < unique[-1] + 1 else None


def _decode_by_seeking(codec, packets: list, pts: list[int], keys: list[int], unique: list[int],
                       out: _RGBFrames) -> _RGBFrames | None:
    """``out`` with the frames ``unique`` (sorted display indices) put in, decoding ``packets`` (decode order)
    from the keyframe before a wanted frame where that skips enough frames (``_seek_plan``); None where seeking
    does not pay or anything does not go as the packet index says (the caller then decodes sequentially). A frame's
    display index is the rank of its pts among all packets' pts."""
    plan = _seek_plan(pts, keys, unique)
    if plan is None:
        return None
    position_of = {p.pts: i for i, p in enumerate(packets) if p.is_keyframe}
    runs = []  # (the position of the keyframe to decode from, the wanted frames' pts decoded from it)
    for index, key in zip(unique, plan):
        if key is not None:
            runs.append((position_of[key], []))
        runs[-1][1].append(pts[index])
    return _decode_runs(codec, packets, runs, {pts[i]: row for row, i in enumerate(unique)}, out)


def _decode_runs(codec, packets: list, runs: list, row_of: dict, out: _RGBFrames) -> _RGBFrames | None:
    """Decode ``packets`` (decode order) in runs, each from a flushed decoder (what a seek leads to) at the
    keyframe ``packets[start]`` on to its wanted frames (``runs``: (start, their pts in display order)), and put
    each wanted frame (``row_of``: pts -> row) into ``out``; None if a wanted frame does not come out."""
    # Between a keyframe and a wanted frame only the frames that others are predicted from need decoding: each
    # packet but a wanted one is sent with FFmpeg's skip_frame=NONREF (non-reference B-frames are dropped
    # unseen; nothing refers to them, so every decoded frame is as in sequential decoding). That decision is
    # per packet, which frame threads (decoding packets later, on other threads) would not honour; decoding on
    # one thread also spends less CPU time per clip than FFmpeg's threads restarted at every seek.
    codec.thread_type = "NONE"
    done = set()
    decoding_wanted = None  # skip_frame as last set: DEFAULT (True) or NONREF (False)
    for start, targets in runs:
        codec.flush_buffers()
        next_packet, drained = start, False
        for t, target in enumerate(targets):
            # After the run's last wanted packet the decoder is drained (None): the frames it holds back for
            # reordering come out without decoding the packets that follow (the next run starts from a flush).
            drain_after_target = t + 1 == len(targets)
            target_sent = False
            while target not in done:
                if drained:
                    return None
                if next_packet < len(packets) and not (target_sent and drain_after_target):
                    packet = packets[next_packet]
                    next_packet += 1
                    wanted = packet.pts in row_of
                    target_sent = target_sent or packet.pts == target
                else:  # the last packet is in, or the target: None drains the decoder
                    packet, wanted, drained = None, True, True
                if decoding_wanted is not wanted:  # a call into PyAV: made only when it changes
                    codec.skip_frame = "DEFAULT" if wanted else "NONREF"
                    decoding_wanted = wanted
                for frame in codec.decode(packet):
                    if frame.pts is None:
                        return None
                    if frame.pts >= target and frame.pts in row_of:  # the wanted one, or a later wanted one
                        out.put(row_of[frame.pts], frame)
                        done.add(frame.pts)
    return out


# A header may count a frame or two more than decode (a container's count of packets, say): such a clip is
# sampled on the frames it has. A larger shortfall is a file cut short, whose missing frames no copy of another
# frame may stand in for.
_HEADER_SLACK_FRAMES = 2


def decode_video(path: str, index_fn) -> tuple[torch.Tensor, list[int]]:
    """Decode the frames that ``index_fn(num_frames) -> list[int]`` asks for.

    Returns (frames uint8 (K, H, W, 3) in the order of the unique sorted indices, the indices as
    requested mapped into rows of that tensor). When the video has several keyframes (e.g. re-encoded with
    short GOPs: ``python -m uniformerv2.reencode``), decoding jumps to the keyframe before a wanted frame
    wherever that skips enough frames (``_seek_plan``); otherwise, or if the packets and the decoded frames disagree,
    frames are decoded sequentially up to the largest index (what FFmpeg does anyway for sparse sampling of
    a short clip with few keyframes). Both give the same frames. A video whose stream ends more than
    ``_HEADER_SLACK_FRAMES`` before the frame count in its header is truncated: VideoDecodeError.
    """
    container, stream = open_video_stream(path)
    try:
        n = int(stream.frames or 0)
        decoded = None
        if n <= 0:  # unknown length (webm has none in its header): decode everything once, convert to RGB
            decoded = _decode_all(container, stream)  # only the wanted frames (half the time for 16 of 48)
            n = len(decoded)
        wanted = index_fn(n)
        unique = sorted(set(wanted))
        if decoded is None:
            index = _packet_index(container, stream)
            out = _RGBFrames(len(unique))
            if (index is None or len(index[1]) != n or len(index[2]) < 2
                    or _decode_by_seeking(stream.codec_context, *index, unique, out) is None):
                # sequential, from the start (a fresh container: no seek state to undo)
                container.close()
                container, stream = open_video_stream(path)
                out = _RGBFrames(len(unique))
                count = _decode_sequentially(container, stream, unique, out)
                if count is not None:  # the stream ended before the last wanted frame
                    if n - count > _HEADER_SLACK_FRAMES:
                        raise VideoDecodeError(f"truncated: its header promises {n} frames, {count} decode")
                    container.close()
                    container, stream = open_video_stream(path)
                    decoded = _decode_all(container, stream)
                    wanted = index_fn(len(decoded))
                    unique = sorted(set(wanted))
        if decoded is not None:
            out = _RGBFrames(len(unique))
            for row, i in enumerate(unique):
                out.put(row, decoded[i])
    except VideoDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt stream, bad packet, ...
        raise VideoDecodeError(f"decode failed: {type(exc).__name__}: {exc}") from exc
    finally:
        container.close()
    row = {i: r for r, i in enumerate(unique)}
    return out.tensor, [row[i] for i in wanted]


def _decode_all(container, stream) -> list:
    frames = list(container.decode(stream))
    if not frames:
        raise VideoDecodeError("no frames decoded")
    return frames


def _decode_sequentially(container, stream, unique: list[int], out: _RGBFrames) -> int | None:
    """Put the frames ``unique`` (sorted display indices) into ``out``, decoding every frame up to the last one;
    None when done, else (the stream ends before the last one) the number of frames the stream has."""
    row_of = {i: row for row, i in enumerate(unique)}
    count = 0
    for i, frame in enumerate(container.decode(stream)):
        if i in row_of:
            out.put(row_of[i], frame)
        count = i + 1
        if i >= unique[-1]:
            return None
    if count == 0:
        raise VideoDecodeError("no frames decoded")
    return count
