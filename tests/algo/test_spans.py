"""trace_rl/algo/spans.py: character spans -> token masks, with hand-built offsets and a real fast tokenizer."""
from __future__ import annotations

import math

import pytest
import torch

from trace_rl.algo.spans import SpanStats, batch_span_masks, cap_span_mask, spans_to_token_mask


def naive_mask(spans, offsets, R, text_len):
    """Character by character: token t is in when one of its characters lies in a (clipped) non-empty span."""
    chars = set()
    for s, e in spans:
        chars.update(range(max(s, 0), min(e, text_len)))
    return torch.tensor([t < len(offsets) and any(c in chars for c in range(*offsets[t])) for t in range(R)])


# "ab cd ef gh": tokens "ab", " cd", " ef", " gh", then a special token with empty offsets
OFFS = [(0, 2), (2, 5), (5, 8), (8, 11), (0, 0)]


def test_overlap_rule_and_stats_on_a_hand_built_offset_map():
    mask, st = spans_to_token_mask([(3, 4)], OFFS, 7)
    assert mask.tolist() == [False, True, False, False, False, False, False]
    assert st == SpanStats(spans_total=1)
    # a span ending exactly where a token starts does not reach it; one starting at its last char does
    assert spans_to_token_mask([(0, 2)], OFFS, 5)[0].tolist() == [True, False, False, False, False]
    assert spans_to_token_mask([(4, 6)], OFFS, 5)[0].tolist() == [False, True, True, False, False]


def test_empty_out_of_range_merged_and_unmatched_spans_are_counted():
    offs = [(0, 2), (2, 5), (6, 8), (8, 11)]  # character 5 (say, a trimmed space) belongs to no token
    spans = [(4, 4), (7, 3),       # empty x2
             (9, 20), (-3, 1),     # out of range, clipped to (9, 11) and (0, 1)
             (30, 40),             # out of range, nothing left: dropped
             (5, 6),               # covers no token: unmatched
             (2, 4), (3, 7)]       # overlap: merged into (2, 7)
    mask, st = spans_to_token_mask(spans, offs, 6)
    assert mask.tolist() == [True, True, True, True, False, False]
    # the merged (2, 7) swallows (5, 6) too: 2 spans absorbed, and nothing is left unmatched
    assert st == SpanStats(spans_total=8, spans_empty=2, spans_out_of_range=3, spans_merged=2)
    mask, st = spans_to_token_mask([(5, 6), (6, 7)], offs, 6)
    assert mask.tolist() == [False, False, True, False, False, False]  # touching spans: not merged
    assert st == SpanStats(spans_total=2, spans_unmatched=1)
    # an explicit text length: the special token's (0, 0) never matches, a span past it is out of range
    mask, st = spans_to_token_mask([(0, 1), (10, 12)], OFFS, 5, text_len=11)
    assert mask.tolist() == [True, False, False, True, False] and st.spans_out_of_range == 1


def test_random_spans_match_a_character_level_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 12, (1,), generator=g))
        lens = torch.randint(0, 4, (n,), generator=g).tolist()  # 0: an empty-offset token
        offs, pos = [], 0
        for L in lens:
            gap = int(torch.randint(0, 2, (1,), generator=g))  # sometimes a character no token covers
            offs.append((pos + gap, pos + gap + L))
            pos += gap + L
        text_len = max((e for s, e in offs if e > s), default=0)
        spans = [tuple(sorted(torch.randint(-2, pos + 3, (2,), generator=g).tolist()))
                 for _ in range(int(torch.randint(0, 4, (1,), generator=g)))]
        R = n + int(torch.randint(0, 3, (1,), generator=g))
        mask, st = spans_to_token_mask(spans, offs, R)
        assert mask.tolist() == naive_mask(spans, offs, R, text_len).tolist(), (trial, spans, offs)
        assert st.spans_total == len(spans)
        assert st.spans_empty == sum(e <= s for s, e in spans)


def test_offsets_as_a_tensor_and_bad_input():
    mask, _ = spans_to_token_mask([(3, 9)], torch.tensor(OFFS), 5)
    assert mask.tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="offsets has 5 tokens but response_len is 3"):
        spans_to_token_mask([], OFFS, 3)
    with pytest.raises(ValueError, match=r"spans\[0\] = 3 is not a \(start, end\) pair"):
        spans_to_token_mask([3], OFFS, 5)
    with pytest.raises(TypeError, match="must be ints"):
        spans_to_token_mask([(0.5, 2)], OFFS, 5)
    with pytest.raises(ValueError, match=r"max_frac must be in \[0, 1\]"):
        cap_span_mask(torch.ones(4, dtype=torch.bool), 4, 1.5)


# ------------------------------------------------------------------------------ coverage cap
def naive_cap(mask, n, frac):
    """Whole spans (runs of True) in order of start; the one crossing the budget is truncated."""
    budget = math.floor(frac * n + 1e-9)
    out, used, t = [False] * len(mask), 0, 0
    while t < len(mask):
        if mask[t]:
            end = t
            while end < len(mask) and mask[end]:
                end += 1
            take = min(end - t, budget - used)
            for u in range(t, t + take):
                out[u] = True
            used += take
            t = end
        else:
            t += 1
    return out


def test_cap_keeps_earliest_spans_and_truncates_the_crossing_one():
    m = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    capped, dropped = cap_span_mask(m, 16, 0.25)  # budget 4: span 1 whole (2), span 2 truncated to 2
    assert capped.tolist() == [bool(x) for x in [0, 1, 1, 0, 1, 1, 0, 0, 0] + [0] * 11]
    assert dropped == 2
    big, none = cap_span_mask(m, 100, 0.25)
    assert torch.equal(big, m) and none == 0
    assert cap_span_mask(m, 3, 0.25)[1] == int(m.sum())  # budget 0
    assert torch.equal(cap_span_mask(m, 3, None)[0], m)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        R = int(torch.randint(1, 30, (1,), generator=g))
        mm = torch.rand(R, generator=g) < 0.5
        n, frac = int(torch.randint(0, R + 1, (1,), generator=g)), float(torch.rand(1, generator=g))
        c, d = cap_span_mask(mm, n, frac)
        assert c.tolist() == naive_cap(mm.tolist(), n, frac)
        assert d == int(mm.sum()) - sum(naive_cap(mm.tolist(), n, frac))


def test_batch_helper_stacks_caps_and_sums_stats():
    rm = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8], dtype=torch.bool)
    spans = [[(0, 11)], [(0, 2), (1, 3), (50, 60), (4, 4)]]
    offs = [OFFS, [(0, 2), (2, 5), (5, 8), (8, 11), (11, 14), (14, 17), (17, 20), (20, 23)]]
    mask, stats = batch_span_masks(spans, offs, rm, max_frac=0.5)
    # row 0: tokens 0-3 match, 5 response tokens -> budget 2; row 1: (0, 3) -> tokens 0, 1 (budget 4)
    assert mask.tolist() == [[True, True] + [False] * 6, [True, True] + [False] * 6]
    assert stats == {"spans_total": 5, "spans_empty": 1, "spans_out_of_range": 1, "spans_unmatched": 0,
                     "spans_merged": 1, "tokens_dropped_by_cap": 2}
    with pytest.raises(ValueError, match="the batch has 2"):
        batch_span_masks(spans[:1], offs, rm)


# ------------------------------------------------------------------------------ a real fast tokenizer
@pytest.fixture(scope="module")
def tokenizer():
    from trace_rl.models.tokenizer import build_tokenizer

    corpus = [f"Step {i}: {17 * i % 97} + {31 * i % 89} = {17 * i % 97 + 31 * i % 89}\nSo the answer is "
              f"\\boxed{{{i}}}." for i in range(60)]
    return build_tokenizer(corpus, vocab_size=300)


def test_offset_mapping_of_the_project_tokenizer_aligns_spans(tokenizer):
    text = "Step 1: 345 * 6 = 2070\nStep 2: 12 + 2070 = 2082\nSo the answer is \\boxed{2082}."
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offs = [tuple(o) for o in enc["offset_mapping"]]
    assert "".join(text[s:e] for s, e in offs) == text  # exact, untrimmed offsets
    error = (text.index("12 + 2070"), text.index("12 + 2070") + len("12 + 2070 = 2082"))
    key = (text.index("2082}"), text.index("2082}") + 4)
    R = len(offs) + 3
    for s, e in (error, key):
        mask, st = spans_to_token_mask([(s, e)], offs, R)
        toks = [t for t in range(R) if mask[t]]
        assert toks == list(range(toks[0], toks[-1] + 1))  # contiguous
        covered = "".join(text[slice(*offs[t])] for t in toks)
        assert text[s:e] in covered and len(covered) <= (e - s) + 2  # at most a leading space/char extra
        # the tokens' decoded text is the span (digits are single tokens, so no token overhangs)
        assert tokenizer.decode(enc["input_ids"][toks[0]: toks[-1] + 1]).strip() == text[s:e]
        assert mask.tolist() == naive_mask([(s, e)], offs, R, len(text)).tolist()
        assert st == SpanStats(spans_total=1)
    # one character inside a multi-character token selects that token
    i = text.index("answer") + 2
    mask, _ = spans_to_token_mask([(i, i + 1)], offs, R)
    (t,), = mask.nonzero().tolist()
    assert offs[t][0] <= i < offs[t][1]


def test_decoded_offsets_of_a_response_with_a_special_token(tokenizer):
    """The annotator sees the text without special tokens: their offsets are empty and never match."""
    from trace_rl.annotate.base import response_token_offsets

    ids = tokenizer("So the answer is \\boxed{42}.", add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    text, offs = response_token_offsets(tokenizer, ids)
    assert offs[-1][0] == offs[-1][1]
    mask, st = spans_to_token_mask([(0, len(text) + 5)], offs, len(ids))
    assert mask.tolist() == [True] * (len(ids) - 1) + [False] and st.spans_out_of_range == 1
