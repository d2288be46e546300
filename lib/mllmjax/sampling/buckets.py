"""Shape buckets of the sampler: a run over many batches compiles a bounded number of programs.

Batch rows and generation length (>= 16) go to powers of two, prompt length (>= 16) to powers of two
and the midpoints 3 * 2^k between them (prefill is a large share of a batch's work, and this caps its
padding at a third instead of a half). A prefix shared by a batch's prompts is cut down to the same
series (`floor_bucket`). `max_new_tokens` itself is a traced value.
"""

from __future__ import annotations

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
DECODE_WINDOWS = 4  # most windows the cache grows through (see decode_windows)
MIN_WINDOW_STEPS = 32  # fewest decode steps per window


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def prompt_bucket(n: int) -> int:
    """The padded prompt length: the smallest 2^k or 3 * 2^(k-1) >= max(n, MIN_PROMPT_BUCKET)."""
    p = bucket(n, MIN_PROMPT_BUCKET)
    return p * 3 // 4 if p * 3 // 4 >= max(n, MIN_PROMPT_BUCKET) else p


def floor_bucket(n: int) -> int:
    """The largest 2^k or 3 * 2^(k-1) <= n (n >= MIN_PROMPT_BUCKET): a length cut down to a bucket."""
    if n < MIN_PROMPT_BUCKET:
        raise ValueError(f"no bucket below {MIN_PROMPT_BUCKET}: {n}")
    p = 1 << (n.bit_length() - 1)  # the largest power of two <= n
    return p * 3 // 2 if p * 3 // 2 <= n else p


def decode_windows(prompt_len: int, out_len: int) -> tuple[int, ...]:
    """The cache lengths a whole run decodes in: the out_len new slots split into at most
    DECODE_WINDOWS windows of at least MIN_WINDOW_STEPS slots each (the last is the full cache).

    A step reads the whole cache it is given, so in windows it reads about what has been written, as
    HF's growing cache does. Growing needs the old and the new window at once, which
    `memory.estimate_sampling` counts."""
    steps = max(MIN_WINDOW_STEPS, out_len // DECODE_WINDOWS)
    return tuple(prompt_len + min(out_len, steps * (i + 1)) for i in range(-(-out_len // steps)))
