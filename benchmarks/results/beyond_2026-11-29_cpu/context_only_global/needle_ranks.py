"""Where question-independent scores rank the needle's code in context-only prompts (diagnostic, output in
needle_ranks.txt): window = CAKE's indicator, h2o / visible = attention of all prompt queries averaged over all /
over the queries that see the key, farmax / farmean = the same without queries within 64 tokens, keydiff = 1 - cosine
to the mean key, -knorm / vnorm = key / value norms. Run from the repository root."""
import random, sys, torch
sys.path.insert(0, "tests"); sys.path.insert(0, ".")
from transformers import AutoModelForCausalLM, AutoTokenizer
from cakekv.eval.common import tiny_model_path
from cakekv.eval.haystack import TokenCounter, haystack_sentences
from cakekv.eval.prompts import encode_prompt
from cakekv.eval.synthetic import fact_sample
from helpers import capture_qkv
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(tiny_model_path())
scale = model.model.layers[0].self_attn.scaling
W = 32
for length, depth, seed in [(2048, 0.5, 1), (1024, 0.2, 2)]:
    s = fact_sample(TokenCounter(tok), haystack_sentences("essay", 1), length, random.Random(seed), depth=depth)
    ids = encode_prompt(tok, s.prompt(tok, False), "context-only").context.reshape(1, -1)
    code = tok(" " + s.expected[0], add_special_tokens=False)["input_ids"]
    start = next(i for i in range(ids.shape[1]) if ids[0, i:i + len(code)].tolist() == code)
    print(length, depth, tok.decode(ids[0, start-12:start+len(code)+1]))
    needle = list(range(start, start + len(code)))
    layers = capture_qkv(model, ids)
    n = ids.shape[1]; P = n - W
    res = {}
    for li, (q, k, v, wo) in enumerate(layers):
        H, hkv = q.shape[0], k.shape[0]; g = H // hkv
        kk = k.repeat_interleave(g, 0)
        logits = (q @ kk.transpose(1, 2)) * scale
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        a = logits.softmax(-1)  # H n n
        win = a[:, -W:]
        far = a.clone(); idx = torch.arange(n)
        far = far.masked_fill((idx[:, None] - idx[None, :]).abs() < 64, 0)
        sc = {"window": win.mean(1) + 200 * win.var(1), "h2o": a.mean(1), "visible": a.sum(1) / (n - idx).float(),
              "farmax": far.amax(1), "farmean": far.sum(1) / (n - idx - 63).clamp(min=1).float(),
              "keydiff": (1 - torch.nn.functional.cosine_similarity(kk, kk[:, :P].mean(1, keepdim=True), dim=-1)),
              "-knorm": -kk.norm(dim=-1), "vnorm": v.repeat_interleave(g, 0).norm(dim=-1)}
        for name, x in sc.items():
            x = x[..., :P].reshape(hkv, g, P).mean(1)
            r = (x[:, :, None] > x[:, None, needle]).sum(1).float()  # rank of each needle token, per head
            res.setdefault(name, []).append(r.median(-1).values)  # median needle-token rank per head
    for name, rs in res.items():
        r = torch.stack(rs)  # L x hkv
        print(f"  {name:8s} median rank per layer (best head): " + " ".join(f"{int(x.min()):4d}" for x in r),
              " | heads with median rank<96:", int((r < 96).sum()), "/", r.numel())
