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


def _seek_plan(unique: list[int], key_before) -> list[int | None] | None:
    """For each wanted frame (sorted display indices), the display index of the keyframe to decode from
    (``key_before(index)``: the last keyframe at or before it, or None), or None to continue from the last frame;
    None (the whole plan) where no keyframe precedes a wanted frame, or where the plan would not decode fewer
    frames than reading sequentially to the last one."""
    plan, decoded, position = [], 0, None
    for index in unique:
        key_index = key_before(index)
        if key_index is None:
            return None
        seek = position is None or key_index - position - 1 > _SEEK_COST_FRAMES
        decoded += (index - key_index + 1 + _SEEK_COST_FRAMES) if seek else (index - position)
        plan.append(key_index if seek else None)
        position = index
    return plan if decoded < unique[-1] + 1 else None


def _decode_by_seeking(container, stream, n: int, unique: list[int], out: _RGBFrames) -> _RGBFrames | None:
    """``out`` with the frames ``unique`` (sorted display indices of the ``n``) put in, each decoded from the
    keyframe before it where that skips enough frames (``_seek_plan``); None where seeking does not pay or
    anything does not go as the index says (the caller then decodes sequentially from a fresh container).

    H.264 in mp4 is read from the container's own index (``_runs_from_container_index``): only the keyframe
    runs that hold wanted frames are demuxed; other videos are demuxed whole once (``_packet_index``)."""
    runs = _runs_from_container_index(container, stream, n, unique)
    if runs is _INDEX_MISMATCH:  # (a keyframe that is not an IDR picture, say) back to the first packet
        try:
            container.seek(_BEFORE_THE_FIRST_FRAME, stream=stream, backward=True)
        except Exception:  # noqa: BLE001 - the caller then decodes sequentially
            return None
    if runs is _NO_CONTAINER_INDEX or runs is _INDEX_MISMATCH:
        runs = _runs_from_packet_index(container, stream, n, unique)
    if runs is None:
        return None
    return _decode_runs(stream.codec_context, runs, out)


def _runs_from_packet_index(container, stream, n: int, unique: list[int]) -> list | None:
    """The runs for ``_decode_runs`` from every packet of the stream (``_packet_index``): a frame's display
    index is the rank of its pts among all packets' pts. None where there is no such index, fewer than two
    keyframes, or seeking does not pay."""
    index = _packet_index(container, stream)
    if index is None or len(index[1]) != n or len(index[2]) < 2:
        return None
    packets, pts, keys = index

    def key_before(i):
        k = bisect.bisect_right(keys, pts[i]) - 1
        return bisect.bisect_left(pts, keys[k]) if k >= 0 else None

    plan = _seek_plan(unique, key_before)
    if plan is None:
        return None
    position_of = {p.pts: i for i, p in enumerate(packets) if p.is_keyframe}
    runs = []
    for row, (index, key) in enumerate(zip(unique, plan)):
        if key is not None:
            runs.append((packets, position_of[pts[key]], {}))
        runs[-1][2][pts[index]] = row
    return runs


_NO_CONTAINER_INDEX, _INDEX_MISMATCH = object(), object()
# a timestamp before any frame's: the mp4 demuxer seeks to its first sample
_BEFORE_THE_FIRST_FRAME = -(1 << 62)

# NAL unit types (H.264, table 7-1): the first slice of a coded picture says whether it is an IDR picture
_NAL_SLICE, _NAL_IDR_SLICE = 1, 5


def _is_idr(packet, length_size: int) -> bool:
    """Whether an H.264 packet in mp4 form (NAL units each prefixed by its ``length_size``-byte length) codes an
    IDR picture: the decoder then holds no earlier frame, and outputs every earlier frame before it."""
    data = bytes(packet)
    pos = 0
    while pos + length_size < len(data):
        nal_type = data[pos + length_size] & 0x1F
        if nal_type in (_NAL_SLICE, _NAL_IDR_SLICE):
            return nal_type == _NAL_IDR_SLICE
        pos += length_size + int.from_bytes(data[pos:pos + length_size], "big")
    return False


def _runs_from_container_index(container, stream, n: int, unique: list[int]):
    """The runs for ``_decode_runs`` for H.264 in mp4, whose demuxer reads the sample table (every frame's dts
    and keyframe flag, in decode order) when the file is opened, without demuxing every packet: only each run's
    packets, from the IDR picture before a wanted frame to the next IDR picture. Frames before an IDR picture in
    decode order are all output before it and those after it after, so a frame's display index is the IDR's
    position in decode order plus the rank of the frame's pts within its run. ``_NO_CONTAINER_INDEX`` for other
    videos or where the index does not count ``n`` frames; None where seeking does not pay; ``_INDEX_MISMATCH``
    where the packets do not match the index (a keyframe that is not an IDR picture, a packet without pts, ...)."""
    extradata = stream.codec_context.extradata
    # avcC extradata (version 1): the packets' NAL units are length-prefixed, of (byte 4 & 3) + 1 bytes
    if (stream.codec_context.name != "h264" or not container.format.name.startswith("mov,")
            or not extradata or len(extradata) < 7 or extradata[0] != 1):
        return _NO_CONTAINER_INDEX
    entries = stream.index_entries
    if len(entries) != n:
        return _NO_CONTAINER_INDEX
    length_size = (extradata[4] & 3) + 1

    def key_before(i):  # the keyframe at or before decode position i
        k = entries.search_timestamp(entries[i].timestamp, backward=True)
        return k if 0 <= k <= i else None

    if _seek_plan(unique, key_before) is None:
        return None
    runs, key_delay = [], None  # (key position, its run's packets, their pts sorted, wanted pts -> row)
    for row, index in enumerate(unique):
        key = key_before(index)  # a run ends at the next IDR picture: a frame past it starts a run of its own
        if not runs or key != runs[-1][0]:
            packets, key_delay = _demux_run(container, stream, entries, key, key_delay, length_size)
            if packets is None:
                return _INDEX_MISMATCH
            runs.append((key, packets, sorted(p.pts for p in packets), {}))
        key_position, packets, pts, targets = runs[-1]
        if index - key_position >= len(packets):
            return _INDEX_MISMATCH
        targets[pts[index - key_position]] = row
    return [(packets, 0, targets) for _, packets, _, targets in runs]


_LANDED_LATE = object()


def _demux_run(container, stream, entries, key: int, key_delay, length_size: int):
    """(the packets from the IDR picture at decode position ``key`` up to the next IDR picture, the key packet's
    pts - dts), or (None, None) where they do not match the index. The mp4 demuxer seeks by presentation
    time: to a keyframe's dts plus its pts - dts (``key_delay``: the last run's, the same in a constant-delay
    stream); a seek that lands earlier is demuxed forward to the key, one that lands later is redone at the
    dts (which lands at or before the key)."""
    dts = entries[key].timestamp
    for target in ([dts + key_delay, dts] if key_delay else [dts]):
        try:
            container.seek(target, stream=stream, backward=True)
        except Exception:  # noqa: BLE001 - the caller then decodes sequentially
            return None, None
        packets = _read_run(container, stream, entries, key, length_size)
        if packets is not _LANDED_LATE:
            return (packets, packets[0].pts - dts) if packets else (None, None)
    return None, None


def _read_run(container, stream, entries, key: int, length_size: int):
    """The packets from the IDR picture at decode position ``key`` up to the next IDR picture or the end of the
    stream, demuxed from where the last seek landed; ``_LANDED_LATE`` past the key; None where the packets do
    not match the index."""
    dts = entries[key].timestamp
    packets = []
    for packet in container.demux(stream):
        end_of_stream = packet.size == 0  # the demuxer's final empty packet
        if not end_of_stream and (packet.pts is None or packet.dts is None or packet.is_discard):
            return None
        if not packets:
            if end_of_stream:
                return None
            if packet.dts < dts:  # landed at an earlier keyframe
                continue
            if packet.dts > dts:
                return _LANDED_LATE
            if not (packet.is_keyframe and _is_idr(packet, length_size)):
                return None
        elif end_of_stream or (packet.is_keyframe and _is_idr(packet, length_size)):
            end = key + len(packets)  # the run ends where the index says the stream or the next IDR begins
            if end_of_stream:
                return packets if end == len(entries) else None
            return packets if end < len(entries) and entries[end].timestamp == packet.dts else None
        packets.append(packet)
    return None


def _decode_runs(codec, runs: list, out: _RGBFrames) -> _RGBFrames | None:
    """Decode runs of packets, each from a flushed decoder (what a seek leads to): ``runs`` holds (packets in
    decode order, the position of the keyframe to start from, the wanted frames' pts -> row in ``out``, in
    display order); each wanted frame is put into its row of ``out``. None if a wanted frame does not come out."""
    # Between a keyframe and a wanted frame only the frames that others are predicted from need decoding: each
    # packet but a wanted one is sent with FFmpeg's skip_frame=NONREF (non-reference B-frames are dropped
    # unseen; nothing refers to them, so every decoded frame is as in sequential decoding). That decision is
    # per packet, which frame threads (decoding packets later, on other threads) would not honour; decoding on
    # one thread also spends less CPU time per clip than FFmpeg's threads restarted at every seek.
    codec.thread_type = "NONE"
    done = set()
    decoding_wanted = None  # skip_frame as last set: DEFAULT (True) or NONREF (False)
    for packets, start, row_of in runs:
        codec.flush_buffers()
        next_packet, drained = start, False
        targets = sorted(row_of)
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
            out = _RGBFrames(len(unique))
            if _decode_by_seeking(container, stream, n, unique, out) is None:
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
