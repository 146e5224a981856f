"""The reference model's modes on a GPU: are the deterministic ones invariant at the Llama-3-8B shape,
and what does each cost?

    python3 benchmarks/gpu/model_modes.py                          # cuda, llama-3-8b, 8192 and 21016 tokens
    python3 benchmarks/gpu/model_modes.py --device cpu --model tiny  # the same checks on CPU, shorter prompts

For each deterministic mode (``exact``, ``batch_invariant``) one prompt is served four ways, and every
layer's K and V of the prompt, plus a few greedy tokens after it, are compared with the first way:

- ``whole``: the prompt in one forward pass;
- ``chunked``: in three chunks that end off block boundaries, then its last tokens one at a time;
- ``batched``: the same chunks, each in a forward pass beside another request's prefill chunk and a
  third request's decode step, at other row offsets;
- ``prefix``: the first half's blocks copied from the whole run into other blocks of a fresh pool
  (as kvbm onboards them), then the rest in chunks.

Then every mode (``fast`` too) is timed on a whole-prompt prefill and one decode step after it, for
each of ``--lengths``. Prints one JSON object; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from dataclasses import dataclass, field

import torch

from kvbm_core.testing import KvPools, Piece, ReferenceModel

TOKENS_PER_BLOCK = 32
DECODE = 4  # greedy tokens compared after the prompt
DEFAULTS = {"cuda": ([8192, 21016], 2048), "cpu": ([512, 2048], 160)}  # (timed lengths, checked length)


@dataclass
class Request:
    """A request's blocks, prompt and chunk schedule; then ``DECODE`` decode steps."""

    table: list[int]
    prompt: list[int]
    chunks: list[int]
    position: int = 0
    tokens: list[int] = field(default_factory=list)

    def next_piece(self) -> Piece | None:
        if self.position < len(self.prompt):
            n = self.chunks.pop(0)
            tokens, last = self.prompt[self.position : self.position + n], self.position + n == len(self.prompt)
        elif self.tokens and len(self.tokens) < DECODE:
            tokens, last = self.tokens[-1:], True
        else:
            return None
        piece = Piece(self.table, self.position, tokens, last)
        self.position += len(tokens)
        return piece


def serve(model: ReferenceModel, pools: KvPools, requests: list[Request]) -> None:
    """Forward passes over every request's next piece together, until all are done."""
    while batch := [(r, p) for r in requests if (p := r.next_piece()) is not None]:
        for (request, _), token in zip(batch, model.forward([p for _, p in batch], pools), strict=True):
            if token is not None:
                request.tokens.append(int(token))


def prompt_kv(model: ReferenceModel, pools: KvPools, request: Request) -> torch.Tensor:
    table = torch.tensor(request.table, device=model.device)
    n = len(request.prompt)
    return torch.stack([torch.stack(pools.read(layer, table, n)) for layer in range(model.shape.num_layers)])


def blocks(tokens: int) -> int:
    return -(-tokens // TOKENS_PER_BLOCK)


def check_invariance(model: ReferenceModel, prompt: list[int], rng: random.Random) -> dict[str, dict]:
    """The four ways of serving ``prompt``; each compared with ``whole``."""
    n, vocab = len(prompt), model.shape.vocab_size
    need = blocks(n + DECODE)
    third = n // 3
    chunks = [third + 3, third, n - 2 * third - 3 - 4, 1, 1, 1, 1]
    own = list(range(need))
    pools = KvPools(model.pool_geometry(3 * need, TOKENS_PER_BLOCK), model.device)
    whole = Request(own, prompt, [n])
    serve(model, pools, [whole])
    reference = prompt_kv(model, pools, whole)
    half = blocks(n // 2) - 1  # whole blocks of the first half
    prefix_bytes = pools.tensors[0][own[:half]].clone()
    results = {"whole": {"tokens": whole.tokens}}

    def compare(name: str, request: Request, where: KvPools) -> None:
        kv = prompt_kv(model, where, request)
        results[name] = {
            "kv_equal": bool(torch.equal(kv, reference)),
            "kv_max_abs_diff": float((kv.float() - reference.float()).abs().max()),
            "tokens_equal": request.tokens == whole.tokens,
            "tokens": request.tokens,
        }

    chunked = Request(own, prompt, list(chunks))
    serve(model, pools, [chunked])
    compare("chunked", chunked, pools)
    others = [
        Request(list(range(need, 2 * need)), [rng.randrange(vocab) for _ in range(n)], [n // 2 + 7, n - n // 2 - 7]),
        Request(list(range(2 * need, 3 * need)), [rng.randrange(vocab) for _ in range(n // 4)], [n // 4]),
    ]
    serve(model, pools, [others[1]])  # its prompt done, it decodes beside the target's first chunks
    batched = Request(own, prompt, list(chunks))
    serve(model, pools, [others[0], batched, others[1]])
    compare("batched", batched, pools)
    fresh = KvPools(model.pool_geometry(3 * need, TOKENS_PER_BLOCK), model.device)
    moved = list(range(3 * need - 1, 2 * need - 1, -1))  # other block ids, in reverse
    fresh.tensors[0][moved[:half]] = prefix_bytes
    start = half * TOKENS_PER_BLOCK
    loaded = Request(moved, prompt, [n - start - 4, 1, 1, 1, 1], position=start)
    serve(model, fresh, [loaded])
    compare("prefix", loaded, fresh)
    return results


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_prefill(model: ReferenceModel, prompt: list[int]) -> dict[str, float]:
    """One whole-prompt prefill, then one decode step after it, in seconds."""
    n = len(prompt)
    pools = KvPools(model.pool_geometry(blocks(n + 1), TOKENS_PER_BLOCK), model.device)
    table = list(range(blocks(n + 1)))
    synchronize(model.device)
    began = time.perf_counter()
    (token,) = model.forward([Piece(table, 0, prompt, True)], pools)
    next_token = int(token)
    prefill = time.perf_counter() - began
    began = time.perf_counter()
    int(model.forward([Piece(table, n, [next_token], True)], pools)[0])
    return {"prefill_s": round(prefill, 4), "decode_step_s": round(time.perf_counter() - began, 4),
            "prefill_tokens_per_s": round(n / prefill, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="reference model preset (default: llama-3-8b on cuda, tiny on cpu)")
    p.add_argument("--modes", default="exact,batch_invariant,fast")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths to time")
    p.add_argument("--check-tokens", type=int, default=None, help="prompt length of the invariance checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    model_name = args.model or ("llama-3-8b" if kind == "cuda" else "tiny")
    default_lengths, default_check = DEFAULTS[kind]
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else default_lengths
    check_tokens = args.check_tokens or default_check
    rng = random.Random(args.seed)
    out: dict = {"device": torch.cuda.get_device_name(device) if kind == "cuda" else "cpu", "model": model_name,
                 "torch": torch.__version__, "tokens_per_block": TOKENS_PER_BLOCK, "checks": {}, "timings": {}}
    max_seq_len = max([*lengths, check_tokens]) + DECODE + 1
    for mode in args.modes.split(","):
        model = ReferenceModel(model_name, seed=args.seed, device=device, max_seq_len=max_seq_len, mode=mode)
        vocab = model.shape.vocab_size
        time_prefill(model, [rng.randrange(vocab) for _ in range(min(256, check_tokens))])  # warm-up
        entry = {"tiles": model.tiles}
        if mode != "fast":
            began = time.perf_counter()
            entry.update(check_invariance(model, [rng.randrange(vocab) for _ in range(check_tokens)], rng))
            entry["check_s"] = round(time.perf_counter() - began, 2)
        out["checks"][mode] = entry
        out["timings"][mode] = {str(n): time_prefill(model, [rng.randrange(vocab) for _ in range(n)]) for n in lengths}
        print(f"{mode}: {json.dumps(out['timings'][mode])}", file=sys.stderr, flush=True)
        del model
        gc.collect()
        if kind == "cuda":
            torch.cuda.empty_cache()
    fast = out["timings"].get("fast")
    if fast:
        out["prefill_vs_fast"] = {mode: {n: round(t["prefill_s"] / fast[n]["prefill_s"], 2) for n, t in timed.items()}
                                  for mode, timed in out["timings"].items()}
    failed = [f"{mode}/{way}" for mode, entry in out["checks"].items() for way, r in entry.items()
              if isinstance(r, dict) and (r.get("kv_equal") is False or r.get("tokens_equal") is False)]
    out["ok"] = not failed
    out["failed"] = failed
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
