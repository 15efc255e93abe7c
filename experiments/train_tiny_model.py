#!/usr/bin/env python
"""Train the tiny long-context Llama shipped in cakekv/assets/tiny-llama, in one command.

    python3 experiments/train_tiny_model.py --out OUT_DIR --minutes 8                # GPU (H100), the real run
    python3 experiments/train_tiny_model.py --out /tmp/tiny --minutes 0.3 --smoke   # CPU smoke test

--minutes is the wall-clock budget of the WHOLE command (corpus, tokenizer, training, save, evaluation):
training stops early enough to leave --eval-reserve-s seconds for saving and the needle evaluation.

Steps:
 1. corpus: real text read from this machine (site-packages, stdlib, /usr/share/doc, ...), held-out
    files excluded (experiments/tiny_data.py, `collect_corpus`);
 2. tokenizer: byte-level BPE (digits split) trained on the corpus with `tokenizers`;
 3. model: LlamaForCausalLM, GQA, RoPE (theta 5e5), tied embeddings, max_position_embeddings 8192;
 4. training: AdamW, warmup + cosine schedule over the time budget, bf16 autocast, sdpa (flash)
    attention, on synthetic retrieval documents built from the corpus (`NeedleDocSampler`: facts hidden
    at random depths and asked about, repeated spans, plain text); a length curriculum by fraction of
    the training time, from 256-token sequences (small, fast steps: retrieval is discovered there) to
    8320 tokens (just past max_position_embeddings=8192, so that an 8192-token prompt and its answer
    stay within trained positions); loss = mean LM loss on all tokens + answer_weight * mean loss on
    the answer tokens + copy_weight * mean loss on the repeated-span tokens;
 5. save (bf16 safetensors + tokenizer + generation config), reload with AutoModelForCausalLM /
    AutoTokenizer, evaluate full-cache needle accuracy at 1K/2K/4K/8K (`evaluate_needle`), and write
    train_log.json and a README.md model card into --out.
"""
from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tiny_data as td  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


FULL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, layers=8, heads=8, kv_heads=2, max_len=8192,
            tokens_per_step=131072, corpus_mb=150.0, tokenizer_mb=30.0, curriculum="0:256:32768,0.1:1024:65536,0.2:2048,0.32:4096,0.5:8320",
            eval_lengths="1024,2048,4096,8192", eval_n=10, eval_batch=10, eval_reserve_s=60.0, warmup_steps=200,
            workers=min(8, max(1, (os.cpu_count() or 2) - 2)), min_train_s=30.0, log_every=50)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, layers=2, heads=4, kv_heads=2, max_len=512,
             tokens_per_step=4096, corpus_mb=3.0, tokenizer_mb=2.0, curriculum="0:128:2048,0.3:256,0.6:544",
             eval_lengths="256,512", eval_n=2, eval_batch=2, eval_reserve_s=12.0, warmup_steps=5, workers=1,
             min_train_s=6.0, log_every=5)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (HF model + tokenizer + train_log.json + README.md)")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the whole command")
    ap.add_argument("--smoke", action="store_true", help="tiny model / context / corpus, for a CPU end-to-end test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--answer-weight", type=float, default=1.0, help="weight of the mean answer-token loss")
    ap.add_argument("--copy-weight", type=float, default=0.5, help="weight of the mean loss on repeated-span tokens")
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="torch threads when training on CPU (1: robust on small, shared machines)")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v} (smoke: {SMOKE[k]})")
    args = ap.parse_args()
    base = SMOKE if args.smoke else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def parse_curriculum(spec: str, max_len: int, tokens_per_step: int) -> list[tuple[float, int, int]]:
    """'FRAC:SEQ_LEN[:TOKENS_PER_STEP],...' -> [(start fraction of training time, seq_len, tokens/step)]."""
    phases = []
    for part in spec.split(","):
        fields = part.split(":")
        frac, length = float(fields[0]), int(fields[1])
        tokens = int(fields[2]) if len(fields) > 2 else tokens_per_step
        # the last phase may run a little past max_position_embeddings, so that an 8192-token prompt
        # plus its generated answer stays within trained positions
        phases.append((frac, min(length, max_len + 512), tokens))
    phases.sort()
    if not phases or phases[0][0] != 0.0:
        raise ValueError("curriculum must start at fraction 0")
    return phases


class BatchStream(torch.utils.data.IterableDataset):
    """Endless (ids, answer_mask) batches of one shape from a NeedleDocSampler (one seed per worker)."""

    def __init__(self, sampler: td.NeedleDocSampler, batch_size: int, seq_len: int, seed: int):
        super().__init__()
        self.sampler, self.batch_size, self.seq_len, self.seed = sampler, batch_size, seq_len, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        self.sampler.reseed(self.seed * 1000 + (info.id if info is not None else 0))
        while True:
            ids, mask = self.sampler.batch(self.batch_size, self.seq_len)
            yield torch.from_numpy(ids), torch.from_numpy(mask)


def make_loader(sampler, batch_size, seq_len, seed, workers, pin):
    ds = BatchStream(sampler, batch_size, seq_len, seed)
    if workers <= 0:
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    ctx = "fork" if sys.platform.startswith("linux") else None
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=4, multiprocessing_context=ctx)


class _RepeatKVForTraining:
    """While active, HF's sdpa path expands K/V heads itself (repeat_kv) instead of passing
    enable_gqa=True, so that SDPA's flash kernel is always eligible (bf16, is_causal, no mask)."""

    def __enter__(self):
        from transformers.integrations import sdpa_attention
        self.mod, self.orig = sdpa_attention, sdpa_attention.use_gqa_in_sdpa
        sdpa_attention.use_gqa_in_sdpa = lambda *a, **k: False
        return self

    def __exit__(self, *exc):
        self.mod.use_gqa_in_sdpa = self.orig


def build_model(args, tok_vocab: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(
        vocab_size=tok_vocab, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads, max_position_embeddings=args.max_len, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta}, tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, attention_bias=False, mlp_bias=False,
        initializer_range=0.02, attn_implementation="sdpa", use_cache=True)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def write_model_card(path, args, argv, info):
    ev = info.get("needle_eval") or {}
    by_len = ev.get("by_length", {})
    rows = "\n".join(f"| {L} | {by_len.get(str(L), float('nan')):.3f} |" for L in info["eval_lengths"])
    depth_rows = "\n".join(f"| {d} | {a:.3f} |" for d, a in ev.get("by_depth", {}).items())
    c = info["config"]
    corpus = info["corpus"]
    exts = ", ".join(f"{'no extension' if k == '(none)' else k} {v / 1e6:.1f}M"
                     for k, v in list(corpus.get("chars_by_ext", {}).items())[:8])
    precision = ("bf16 autocast (fp32 master weights), SDPA flash attention" if info["device_name"] != "cpu"
                 and not info["device_name"].startswith("CPU") else "fp32, SDPA attention")
    extra = ""
    if info.get("needle_eval_fp32"):
        e32 = info["needle_eval_fp32"]
        extra += (f"\nThe same evaluation with the weights loaded in float32, at the longest length only: "
                  f"{e32['accuracy']:.3f} ({e32['correct']}/{e32['n']}).\n")
    if info.get("needle_eval_magic"):
        em = info["needle_eval_magic"]
        by = ", ".join(f"{k}: {v:.3f}" for k, v in em["by_length"].items())
        extra += (f"\nRULER's needle format instead (`template=\"magic\"`: \"One of the special magic numbers for "
                  f"KEY is: NNNNNNN.\", 7 digits, {em['settings']['n_per_cell']} prompts per cell): "
                  f"{em['accuracy']:.3f} overall ({by}).\n")
    text = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tiny, long-context, kv-cache, test-asset]
---

# cakekv tiny-llama

A {info['n_params'] / 1e6:.2f}M-parameter Llama (`LlamaForCausalLM`) trained from scratch in a few minutes so that
cakekv's tests and demo have a model with real attention patterns (attention sinks on `<s>`, local heads,
long-range retrieval / induction heads) at up to {c['max_position_embeddings']} tokens. It is a test asset, not a
language model for any real use: it writes code-like text and retrieves planted facts.

| | |
|---|---|
| architecture | Llama, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, MLP {c['intermediate_size']} (SwiGLU) |
| attention | {c['num_attention_heads']} query heads, {c['num_key_value_heads']} KV heads (GQA), head_dim {c['head_dim']}, RoPE theta {args.rope_theta:g} |
| context | max_position_embeddings {c['max_position_embeddings']} (trained on sequences of up to {info['train_max_len']} tokens) |
| vocabulary | {c['vocab_size']} byte-level BPE tokens (digits split), `<pad>`=0 `<s>`=1 `</s>`=2; `<s>` is prepended; padding side left |
| weights | {info['weights_bytes'] / 1e6:.2f} MB safetensors, {info['saved_dtype']}, tied input/output embeddings |

## Needle in a haystack (full cache)

One fact "The secret code of NAME is NNNNN." (5 random digits, random person-like name) at depth
0/0.25/0.5/0.75/1.0 of held-out real text, then "What is the secret code of NAME? The secret code of NAME is";
greedy decoding, exact match of the digits. {ev.get('settings', {}).get('n_per_cell', '?')} prompts per (length, depth)
cell; prompts from `experiments/tiny_data.py` (`make_needle_example`, `evaluate_needle`, seed
{ev.get('settings', {}).get('seed', 0)}); the model evaluated is the saved one, reloaded with
`AutoModelForCausalLM` in {info['eval_dtype']} on {info['device_name']}.

| context tokens | accuracy |
|---|---|
{rows}

Overall: **{ev.get('accuracy', float('nan')):.3f}** ({ev.get('correct', 0)}/{ev.get('n', 0)}).

| depth | accuracy |
|---|---|
{depth_rows}
{extra}
## Training

Command (run on {info['device_name']}, torch {torch.__version__}, transformers {info['transformers']}):

```
{argv}
```

- Text: read at run time from the training machine's files: source code and documentation of the installed
  Python packages (site-packages), the Python standard library, /usr/share/doc, ... ({corpus.get('files_used')} files,
  {corpus.get('chars', 0) / 1e6:.0f}M characters; by extension: {exts}). About 3% of files (by a hash of their last
  two path components, `tiny_data.is_heldout`) are held out and never trained on; the evaluation haystacks
  come from the held-out files of the standard library (`tiny_data.default_filler_text`).
- Synthetic retrieval documents (`tiny_data.NeedleDocSampler`): the real text with facts "The ATTRIBUTE of
  NAME is CODE." (3-8 digits, {len(td.ATTRIBUTES)} attributes) inserted at uniformly random depths, and questions
  "What is the ATTRIBUTE of NAME? The ATTRIBUTE of NAME is CODE." Mix per sequence: plain text 4%, text with
  1-3 earlier spans (16-256 tokens) repeated verbatim later 12%, a single fact asked at the end 36%, 2-12
  facts with hard negatives (same name other attribute, shared first or last name) of which 1-4 are asked
  at the end 33%, facts asked at random later points 15%. In 20% of the documents with facts, the facts
  use RULER's needle format instead ("One of the special magic numbers for KEY is: CODE.", asked "What is
  the special magic number for KEY mentioned in the provided text? The special magic number for KEY
  mentioned in the provided text is"). Facts sit on a line of their own at a line start, or inside a line
  after a sentence end (15% of "secret code" facts, 70% of magic-number facts).
- Loss: mean next-token cross-entropy on all tokens + {args.answer_weight} x mean cross-entropy on the answer
  tokens + {args.copy_weight} x mean cross-entropy on the repeated-span tokens.
- Length curriculum (start fraction of training time : sequence length [: tokens per step]): {args.curriculum}
  (default {args.tokens_per_step} tokens per step); AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak lr {args.lr}, {args.warmup_steps} warmup steps,
  cosine decay over the time budget to {args.min_lr_frac} x peak; {precision}, grad clip 1.0.
- {info['steps']} steps, {info['tokens_seen'] / 1e6:.0f}M tokens, {info['train_seconds']:.0f} s of training;
  final loss {info.get('final_loss', float('nan')):.3f} (LM {info.get('final_lm_loss', float('nan')):.3f}, answer {info.get('final_ans_loss', float('nan')):.3f}).
  The training run also writes `train_log.json` (arguments, corpus statistics, loss / answer accuracy every
  {args.log_every} steps, needle probes after each curriculum phase, the full evaluation).

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("cakekv/assets/tiny-llama", dtype="float32")
tok = AutoTokenizer.from_pretrained("cakekv/assets/tiny-llama")

# needle in a haystack, as evaluated above (experiments/tiny_data.py)
import tiny_data as td   # with experiments/ on sys.path
filler = td.default_filler_text()
ex = td.make_needle_example(tok, context_tokens=4096, depth=0.5, seed=0, filler_text=filler)
acc = td.evaluate_needle(model, tok, lengths=[1024, 4096], depths=[0.0, 0.5, 1.0], n_per_cell=5)
```
"""
    with open(path, "w") as f:
        f.write(text)


def main():
    args = parse_args()
    deadline = T_START + args.minutes * 60.0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    os.makedirs(args.out, exist_ok=True)
    argv = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    log(f"start: {argv}")
    log(f"python {platform.python_version()}, torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else "") + f", {os.cpu_count()} cpus")
    random_seed = args.seed
    np.random.seed(random_seed)
    if not cuda and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)

    # 1. corpus ------------------------------------------------------------------------------------
    texts, corpus_stats = td.collect_corpus(int(args.corpus_mb * 1e6), seed=args.seed, threads=16, log=log)
    if not texts:
        raise SystemExit("no text found on this machine")

    # 2. tokenizer ---------------------------------------------------------------------------------
    t0 = time.time()
    tok_texts, n = [], 0
    for t in texts:
        tok_texts.append(t)
        n += len(t)
        if n >= args.tokenizer_mb * 1e6:
            break
    raw_tok = td.train_bpe_tokenizer(tok_texts, args.vocab_size)
    hf_tok = td.to_hf_tokenizer(raw_tok, model_max_length=args.max_len)
    hf_tok.save_pretrained(args.out)
    log(f"tokenizer: {raw_tok.get_vocab_size()} tokens trained on {n / 1e6:.1f} M chars in {time.time() - t0:.1f} s")
    t0 = time.time()
    corpus_ids = td.tokenize_corpus(raw_tok, texts)
    corpus_stats["tokens"] = int(corpus_ids.size)
    del texts, tok_texts
    log(f"corpus tokenized: {corpus_ids.size / 1e6:.1f} M tokens in {time.time() - t0:.1f} s")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers are forked from here on

    # 3. model -------------------------------------------------------------------------------------
    bos, eos, pad = (raw_tok.token_to_id(x) for x in (td.BOS, td.EOS, td.PAD))
    model = build_model(args, raw_tok.get_vocab_size(), bos, eos, pad).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters ({n_params * 2 / 1e6:.1f} MB in 16-bit), config "
        f"L={args.layers} d={args.hidden_size} heads={args.heads}/{args.kv_heads} mlp={args.intermediate_size}")
    model.config.use_cache = False
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if cuda:
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)
    fwd = model
    if args.compile:
        fwd = torch.compile(model)
    amp_dtype = torch.bfloat16
    use_amp = cuda  # bf16 autocast on the GPU; fp32 on CPU (CPU bf16 matmuls are slow without native support)
    if cuda:
        try:  # informational: is the flash kernel available for our shapes?
            from torch.nn.attention import SDPBackend, sdpa_kernel
            q = torch.randn(2, args.heads, 256, args.hidden_size // args.heads, device=device, dtype=amp_dtype)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            log("sdpa: flash attention kernel available")
        except Exception as e:  # noqa: BLE001
            log(f"sdpa: flash kernel NOT available ({type(e).__name__}: {e}); another kernel will be used")

    # 4. training ----------------------------------------------------------------------------------
    sampler = td.NeedleDocSampler(raw_tok, corpus_ids, seed=args.seed)
    phases = parse_curriculum(args.curriculum, args.max_len, args.tokens_per_step)
    train_t0 = time.time()
    train_end = max(deadline - args.eval_reserve_s, train_t0 + args.min_train_s)
    budget = train_end - train_t0
    log(f"training for {budget:.0f} s; curriculum {phases}; {args.tokens_per_step} tokens/step; workers {args.workers}")
    V = raw_tok.get_vocab_size()
    history: list[dict] = []
    probes: list[dict] = []
    step, tokens_seen = 0, 0
    acc_n, acc_vals = 0, None
    last_log_t, last_log_tokens = time.time(), 0
    filler = td.default_filler_text()
    with _RepeatKVForTraining():
        for pi, (frac, T, phase_tokens) in enumerate(phases):
            phase_end = train_t0 + (phases[pi + 1][0] if pi + 1 < len(phases) else 1.0) * budget
            if time.time() >= phase_end:
                continue
            B = max(1, phase_tokens // T)
            loader = make_loader(sampler, B, T, args.seed * 100 + pi, args.workers, pin=cuda)
            log(f"phase {pi}: seq_len {T}, batch {B}, until t={phase_end - T_START:.0f}s")
            it = iter(loader)
            while time.time() < phase_end:
                ids, amask = next(it)
                ids = ids.to(device, non_blocking=True).long()
                amask = amask.to(device, non_blocking=True)
                el = (time.time() - train_t0) / budget
                lr_scale = min(1.0, (step + 1) / args.warmup_steps)
                lr_scale *= args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, el)))
                for g in opt.param_groups:
                    g["lr"] = args.lr * lr_scale
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = fwd(input_ids=ids, use_cache=False).logits
                logits = logits[:, :-1].float()
                tgt = ids[:, 1:]
                ce = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none").view_as(tgt)
                m = amask[:, 1:]
                w = (m == td.ANSWER).float()
                wc = (m == td.COPY).float()
                n_ans = w.sum().clamp(min=1.0)
                lm_loss = ce.mean()
                ans_loss = (ce * w).sum() / n_ans
                copy_loss = (ce * wc).sum() / wc.sum().clamp(min=1.0)
                loss = lm_loss + args.answer_weight * ans_loss + args.copy_weight * copy_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                tokens_seen += ids.numel()
                with torch.no_grad():
                    tokacc = (((logits.argmax(-1) == tgt).float() * w).sum() / n_ans)
                    vals = torch.stack([loss.detach(), lm_loss.detach(), ans_loss.detach(), tokacc, copy_loss.detach()])
                    acc_vals = vals if acc_n == 0 else acc_vals + vals
                    acc_n += 1
                del logits, ce
                if step % args.log_every == 0 or step == 1:
                    v = (acc_vals / acc_n).tolist()
                    acc_n = 0
                    now = time.time()
                    tps = (tokens_seen - last_log_tokens) / max(1e-6, now - last_log_t)
                    last_log_t, last_log_tokens = now, tokens_seen
                    row = {"step": step, "t": round(now - T_START, 1), "seq_len": T, "batch": B, "loss": v[0],
                           "lm_loss": v[1], "ans_loss": v[2], "ans_tok_acc": v[3], "copy_loss": v[4],
                           "lr": args.lr * lr_scale,
                           "grad_norm": float(gnorm), "tokens": tokens_seen, "tok_per_s": tps}
                    history.append(row)
                    log(f"step {step:5d} T={T:5d} loss {v[0]:.3f} lm {v[1]:.3f} ans {v[2]:.3f} ans_acc {v[3]:.3f} "
                        f"copy {v[4]:.3f} "
                        f"lr {row['lr']:.2e} gn {row['grad_norm']:.2f} {tps / 1e6:.2f} Mtok/s {tokens_seen / 1e6:.0f} Mtok")
            del it, loader
            # quick greedy probe at this phase's length (the saved model is evaluated properly at the end)
            if time.time() < train_end - 5:
                model.eval()
                model.config.use_cache = True
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    pacc, pdet = td.evaluate_needle(model, hf_tok, lengths=[T], depths=(0.1, 0.5, 0.9), n_per_cell=4,
                                                    filler_text=filler, seed=999, batch_size=12,
                                                    return_details=True)
                model.config.use_cache = False
                model.train()
                probes.append({"step": step, "seq_len": T, "accuracy": pacc, "seconds": pdet["seconds"]})
                log(f"probe after phase {pi}: needle acc at {T} tokens = {pacc:.3f} ({pdet['seconds']:.1f} s)")
    train_seconds = time.time() - train_t0
    log(f"training done: {step} steps, {tokens_seen / 1e6:.0f} M tokens, {train_seconds:.0f} s")

    # 5. save, reload, evaluate --------------------------------------------------------------------
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    model.eval()
    model.config.use_cache = True
    save_dtype = torch.bfloat16
    model = model.to(save_dtype)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.save_pretrained(args.out, safe_serialization=True)
    hf_tok.save_pretrained(args.out)
    weights = os.path.join(args.out, "model.safetensors")
    weights_bytes = os.path.getsize(weights)
    log(f"saved to {args.out}: model.safetensors {weights_bytes / 1e6:.2f} MB; files {sorted(os.listdir(args.out))}")
    del model, fwd, opt
    if cuda:
        torch.cuda.empty_cache()

    eval_dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=eval_dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(args.out)
    assert tok.pad_token_id == pad and tok.padding_side == "left", (tok.pad_token_id, tok.padding_side)
    lengths = [int(x) for x in args.eval_lengths.split(",")]
    log(f"reloaded ({type(model).__name__}, {eval_dtype}, attn {model.config._attn_implementation}); "
        f"needle eval at {lengths}")
    with _RepeatKVForTraining():  # same math as HF's enable_gqa path, but always flash-eligible
        acc, det = td.evaluate_needle(model, tok, lengths=lengths, n_per_cell=args.eval_n, filler_text=filler,
                                      seed=0, batch_size=args.eval_batch, return_details=True,
                                      deadline=max(deadline + 20, time.time() + args.eval_reserve_s), log=log)
    log(f"NEEDLE ACCURACY (full cache): overall {acc:.3f} by length {det['by_length']} ({det['seconds']:.0f} s"
        f"{', PARTIAL' if det['partial'] else ''})")
    det_magic = None
    if time.time() < deadline - 15:  # RULER's needle format, 7 digits, 1K and the longest length
        with _RepeatKVForTraining():
            _, det_magic = td.evaluate_needle(model, tok, lengths=[lengths[0], lengths[-1]],
                                              n_per_cell=max(2, args.eval_n // 2), filler_text=filler, seed=0,
                                              n_digits=7, template="magic", batch_size=args.eval_batch,
                                              return_details=True, deadline=deadline + 10)
        log(f"magic-number needle (RULER format, 7 digits): {det_magic['accuracy']:.3f} by length "
            f"{det_magic['by_length']}")
    det32 = None
    if cuda and time.time() < deadline - 10:  # the same weights in float32 (as the CPU tests load them)
        model32 = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device).eval()
        with _RepeatKVForTraining():
            _, det32 = td.evaluate_needle(model32, tok, lengths=[lengths[-1]], n_per_cell=max(2, args.eval_n // 2),
                                          filler_text=filler, seed=0, batch_size=max(1, args.eval_batch // 2),
                                          return_details=True, deadline=deadline + 15)
        log(f"fp32 check at {lengths[-1]}: {det32['accuracy']:.3f} ({det32['correct']}/{det32['n']})")
        del model32

    import transformers
    last = history[-1] if history else {}
    info = {
        "argv": argv, "args": vars(args), "config": model.config.to_dict(), "n_params": n_params,
        "weights_bytes": weights_bytes, "saved_dtype": str(save_dtype).replace("torch.", ""),
        "eval_dtype": str(eval_dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or 'x86_64'})",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "corpus": corpus_stats, "steps": step, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
        "final_loss": last.get("loss"), "final_lm_loss": last.get("lm_loss"), "final_ans_loss": last.get("ans_loss"),
        "eval_lengths": lengths, "train_max_len": max(p[1] for p in phases), "needle_eval": det,
        "needle_eval_fp32": det32, "needle_eval_magic": det_magic, "probes": probes,
        "history": history, "total_seconds": time.time() - T_START,
    }
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    write_model_card(os.path.join(args.out, "README.md"), args, argv, info)
    log(f"wrote train_log.json and README.md; total {time.time() - T_START:.0f} s")


if __name__ == "__main__":
    main()
