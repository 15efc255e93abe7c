"""A few ragged_attention calls for compute-sanitizer (racecheck, memcheck): multi-piece blocks, multi-step
chunks, empty segments, 1 / 4 / 8 query rows per kv head, with and without weights. Checks the output against
the CPU kernel.

  compute-sanitizer --tool racecheck python3 benchmarks/diag/sanitize_ragged_attention.py
"""
import torch

import cakekv._ops as ops


def run(batch, kv_heads, group, q_len, sizes, dtype):
    g = torch.Generator().manual_seed(len(sizes) * 31 + group)
    offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)))
    T = int(offsets[-1])
    k, v = torch.randn(T, 128, generator=g).to(dtype), torch.randn(T, 128, generator=g).to(dtype)
    pos = torch.cat([torch.randperm(n, generator=g) for n in sizes]) if T else torch.zeros(0, dtype=torch.long)
    pos[::7] = -1  # free slots
    q = torch.randn(batch, kv_heads * group, q_len, 128, generator=g).to(dtype)
    q_pos = torch.full((batch, q_len), max(sizes) - q_len) + torch.arange(q_len)
    want, want_w = ops.ragged_attention_with_weights(q, k, v, pos, offsets, q_pos, 0.09)
    got, got_w = ops.ragged_attention_with_weights(*(t.cuda() for t in (q, k, v, pos, offsets, q_pos)), 0.09)
    torch.testing.assert_close(got.cpu(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_w.cpu(), want_w, atol=2e-3, rtol=2e-2)
    plain = ops.ragged_attention(*(t.cuda() for t in (q, k, v, pos, offsets, q_pos)), 0.09)
    torch.testing.assert_close(plain.cpu(), want, atol=2e-2, rtol=2e-2)


if __name__ == "__main__":
    for dtype in (torch.bfloat16, torch.float32):
        run(1, 8, 4, 1, [1056] * 8, dtype)
        run(2, 2, 8, 1, [3000, 0, 17, 5000], dtype)
        run(1, 4, 1, 3, [700, 64, 0, 1300], dtype)
    print("ok")
