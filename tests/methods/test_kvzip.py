"""KVzip (cakekv/methods/kvzip.py, cakekv/reconstruction.py): the re-read's scores and budgets against a plain
reference with whole attention matrices (tests/reference_methods.py), the budget contract, positions and the cache
after the re-read (nothing of it stored), left-padded batches, families, and the repeat instruction from a
tokenizer."""
from __future__ import annotations

import pytest
import torch

import cakekv
from cakekv import reconstruction
from cakekv import cache_kwargs, cache_of
from cakekv._ops import attention_max
from cakekv.methods.layer_defensivekv import global_counts
from cakekv.reconstruction import repeat_prompt, with_repeat_prompt
import reference_methods as R
from helpers import (BUDGET, WINDOW, assert_batch_rows_alone, byte_tokenizer, kept_prefix, left_padded,
                     masked_full_cache_logits, prefill, prompt, tiny_model)
from reference import assert_same_selection

TASK = dict(first=(3, 4, 5), resume=(6, 7), answer=(8,))  # an instruction, as a tokenizer would give
OPTIONS = dict(chunk_size=48, repeat_ids=TASK["first"], resume_ids=TASK["resume"], answer_ids=TASK["answer"])


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def model(request):
    return tiny_model("llama", kv_heads=request.param)


@pytest.mark.parametrize("ranking", ["global", "layer", "head"])
def test_matches_the_reference(model, ranking):
    ids = prompt(150, seed=3)
    kept, budgets, scores = R.kvzip_reference(model, ids, BUDGET, WINDOW, 48, ranking=ranking, **TASK)
    out, _ = prefill(model, ids, "kvzip", ranking=ranking, **OPTIONS)
    layers = cache_of(out).layers
    assert [layer.head_prefix[0] for layer in layers] == budgets
    for i, layer in enumerate(layers):
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h])
            assert set(range(4)) <= set(got)  # the sinks


@pytest.mark.parametrize("lookback", [0, 20])
def test_span_reread_matches_the_reference(model, lookback):
    """reread='span': each chunk's forward sees only the sinks, `lookback` positions before its span, the span and
    itself; the reference masks a plain forward so."""
    ids = prompt(150, seed=4)
    kept, budgets, scores = R.kvzip_reference(model, ids, BUDGET, WINDOW, 48, lookback=lookback, **TASK)
    out, _ = prefill(model, ids, "kvzip", reread="span", reread_lookback=lookback, **OPTIONS)
    layers = cache_of(out).layers
    assert [layer.head_prefix[0] for layer in layers] == budgets
    for i, layer in enumerate(layers):
        for h, got in enumerate(kept_prefix(layer)):
            assert_same_selection(got, kept[i][h], scores[i][h])
    full, _ = prefill(model, ids, "kvzip", **OPTIONS)  # the span re-read is another one
    assert any(a.head_prefix != b.head_prefix or not torch.equal(a.storage.padded_pos(), b.storage.padded_pos())
               for a, b in zip(layers, cache_of(full).layers))


def test_global_ranking_moves_budget_between_layers_and_heads(model):
    out, _ = prefill(model, prompt(150, seed=3), "kvzip", **OPTIONS)
    counts = [c for layer in cache_of(out).layers for c in layer.head_prefix[0]]
    assert sum(counts) == (BUDGET - WINDOW) * len(cache_of(out).layers) * model.config.num_key_value_heads
    assert len(set(counts)) > 1


@pytest.mark.parametrize("seed", range(40))
def test_global_counts_equal_a_stable_sort_with_ties(seed):
    """The ranking's threshold search keeps what one stable sort keeps: ties broken by layer, head, slot."""
    gen = torch.Generator().manual_seed(seed)
    b, hkv, levels = 1 + seed % 3, 1 + seed % 4, 1 + seed % 5
    indicators = []
    for n in torch.randint(1, 12, (1 + seed % 4,), generator=gen).tolist():
        x = torch.randint(0, levels, (b, hkv, n), generator=gen) / levels
        x[torch.rand(b, hkv, n, generator=gen) < 0.3] = float("-inf")
        x[torch.rand(b, hkv, n, generator=gen) < 0.1] = 2.0
        indicators.append(x)
    size = sum(x[0].numel() for x in indicators)
    for total in (0, 1, size // 3, size // 2, size - 1, size, size + 2):
        assert torch.equal(global_counts(indicators, total), R.global_counts(indicators, total)), total


def test_attention_max_is_the_largest_probability_a_key_gets():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    q_pos = torch.tensor([[-1, -1, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
    k_pos = torch.tensor([[-1, 0, 1, 2, 3, 4, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6, 8, 9]])[:, None].expand(2, 2, 9)
    got = attention_max(q, k, q_pos, k_pos, 0.3)
    visible = (k_pos[:, :, None, None] >= 0) & (k_pos[:, :, None, None] <= q_pos[:, None, None, :, None])
    logits = (q.view(2, 2, 2, 7, 8) @ k[:, :, None].transpose(-1, -2)) * 0.3
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(got, probs.amax((2, 3)))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3"])
def test_continuation_sees_only_the_kept_context_at_its_positions(family):
    """After the re-read the cache holds the prompt's kept entries only, at their positions, within the budget;
    a continuation equals the full cache with the evicted entries hidden (the re-read left nothing behind)."""
    model = tiny_model(family, kv_heads=2)
    ids, cont = prompt(130, seed=7), prompt(5, seed=8)
    out, handle = prefill(model, ids, "kvzip", chunk_size=40, decode_evict=False)
    cache = cache_of(out)
    for layer in cache.layers:
        assert layer.seen == 130 and layer.next_pos.tolist() == [130]
        pos = layer.storage.padded_pos()
        assert pos.max().item() == 129 and pos[pos >= 0].unique().numel() <= 130
    kept = sum(sum(s["kept_per_head"][0]) for s in handle.stats if s["budget"][0] is not None)
    assert kept == BUDGET * len(cache.global_layers) * model.config.num_key_value_heads
    with cakekv.compress(model, "kvzip", budget=BUDGET, window=WINDOW, decode_evict=False), torch.no_grad():
        got = model(input_ids=cont, use_cache=True, **cache_kwargs(model, cache)).logits
    want = masked_full_cache_logits(model, ids, cont, cache)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method,options", [("kvzip", {}), ("kvzip", {"ranking": "layer"}),
                                            ("spanzip", {}), ("spanzip", {"ranking": "cake"})])
def test_one_layer_at_a_time_holds_the_whole_prompt(model, monkeypatch, method, options):
    """The re-read goes layer by layer along the prefill: when a layer has read the prompt, the layers before it
    hold no more than the budget of all layers (kvzip's global ranking cuts them as a cascade, its per-layer
    budgets cut each once), except where the budgets wait for the last layer (spanzip's CAKE ranking); what is
    kept is the reference's either way (test_matches_the_reference)."""
    from cakekv.patch import RereadAlongPrefill
    n, held = 300, []
    real = RereadAlongPrefill._after_layer

    def spy(self, index, module, args, output):
        if not self.running:  # the prompt has just gone through layer `index`
            layers = self.cache.layers
            held.append([int((layers[j].storage.pos >= 0).sum()) for j in range(index + 1)])
        return real(self, index, module, args, output)

    monkeypatch.setattr(RereadAlongPrefill, "_after_layer", spy)
    out, _ = prefill(model, prompt(n, seed=11), method, **options, **OPTIONS)
    layers, hkv = cache_of(out).layers, model.config.num_key_value_heads
    total = BUDGET * len(layers) * hkv
    assert len(held) == len(layers) and all(counts[-1] == n * hkv for counts in held)  # the layer just read
    before = [sum(counts[:-1]) for counts in held]
    if options.get("ranking") == "cake":
        assert before == [i * n * hkv for i in range(len(layers))]
    else:
        assert max(before) <= total < n * hkv * (len(layers) - 1)
    assert sum(int((layer.storage.pos >= 0).sum()) for layer in layers) <= total


def test_the_prefill_output_is_the_uncompressed_models(model):
    ids = prompt(120, seed=2)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out, _ = prefill(model, ids, "kvzip", chunk_size=50)
    torch.testing.assert_close(out.logits, want)


@pytest.mark.parametrize("reread", ["full", "span"])
def test_left_padded_batch_equals_each_row_alone(model, reread):
    assert_batch_rows_alone(model, "kvzip", 30, reread=reread, reread_lookback=10, **OPTIONS)


@pytest.mark.parametrize("reread", ["full", "span"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_query_tiles_give_the_untiled_attention(family, reread, monkeypatch):
    """The masked re-read (a padded batch; Gemma 2: sliding windows and soft-capping) in tiles of 2 queries keeps
    what it keeps in one tile, and the compressed caches continue alike."""
    model = tiny_model(family, kv_heads=2)
    ids, mask = left_padded([prompt(n, seed=50 + n) for n in (90, 130)])

    def compressed():
        with cakekv.compress(model, "kvzip", budget=BUDGET, window=WINDOW, reread=reread, reread_lookback=10,
                             **OPTIONS), torch.no_grad():
            cache = cache_of(model(input_ids=ids, attention_mask=mask, use_cache=True))
            return [layer.storage.padded_pos() for layer in cache.layers]

    whole = compressed()
    monkeypatch.setattr(reconstruction, "_QUERY_TILE_ELEMENTS", 2 * model.config.num_attention_heads * 2 * ids.shape[1])
    for got, want in zip(compressed(), whole):
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_clones_answer_alike_and_the_context_is_compressed_once(model):
    ids, question = prompt(140, seed=9), prompt(6, seed=10)
    with cakekv.compress(model, "kvzip", budget=BUDGET, window=WINDOW, chunk_size=64), torch.no_grad():
        cache = cache_of(model(input_ids=ids, use_cache=True))
        first = model(input_ids=question, use_cache=True, **cache_kwargs(model, cache.clone())).logits
        second = model(input_ids=question, use_cache=True, **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(first, second)


def test_embeddings_without_ids_are_refused(model):
    embeds = model.get_input_embeddings()(prompt(100, seed=1))
    with cakekv.compress(model, "kvzip", budget=BUDGET, window=WINDOW), torch.no_grad():
        with pytest.raises(ValueError, match="^inputs_embeds: method 'kvzip' re-reads"):
            model(inputs_embeds=embeds, use_cache=True)


@pytest.mark.parametrize("name,value,error", [("ranking", "per-layer", ValueError), ("chunk_size", 0, ValueError),
                                              ("sinks", -1, ValueError), ("repeat_ids", "Repeat", TypeError),
                                              ("answer_ids", [1, -1], ValueError)])
def test_bad_options_name_the_argument(model, name, value, error):
    with pytest.raises(error, match=f"^{name}: must be"):
        cakekv.compress(model, "kvzip", budget=BUDGET, window=WINDOW, **{name: value})


def test_repeat_prompt_from_a_tokenizer():
    plain, chat = byte_tokenizer(), byte_tokenizer(chat_template=R_CHAT)
    ids = repeat_prompt(plain)
    assert plain.decode(ids["repeat_ids"]) == "\n\nRepeat the previous context exactly."
    assert plain.decode(ids["answer_ids"]) == "\n"
    assert chat.decode(repeat_prompt(chat)["answer_ids"]) == "<|end|>\n<|assistant|>\n"
    assert with_repeat_prompt("kvzip", {"answer_ids": (5,)}, plain)["answer_ids"] == (5,)
    assert with_repeat_prompt("cake", {"gamma": 1.0}, plain) == {"gamma": 1.0}


R_CHAT = ("{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
