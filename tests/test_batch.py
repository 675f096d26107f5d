from __future__ import annotations

import pytest
import torch

from trace_rl.batch import Batch


def make_batch(B=4, P=3, R=5, seed=0, channels=("pg",)):
    g = torch.Generator().manual_seed(seed)
    resp_len = torch.randint(1, R + 1, (B,), generator=g)
    response_mask = torch.arange(R)[None, :] < resp_len[:, None]
    return Batch(
        prompt_ids=torch.randint(1, 50, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.bool),
        response_ids=torch.randint(1, 50, (B, R), generator=g) * response_mask, response_mask=response_mask,
        behaviour_logprobs=-torch.rand(B, R, generator=g) * response_mask,
        group_ids=torch.arange(B) // 2, policy_version=torch.zeros(B, dtype=torch.long),
        rewards=torch.rand(B, generator=g), advantages=torch.randn(B, R, generator=g) * response_mask,
        channel_names=channels, channel_weights=torch.rand(len(channels), B, R, generator=g) * response_mask,
        meta={"uid": [f"u{i}" for i in range(B)]},
    )


def test_select_and_split_keep_rows_aligned():
    b = make_batch(B=6)
    parts = b.split(3)
    assert [len(p) for p in parts] == [2, 2, 2]
    assert parts[1].meta["uid"] == ["u2", "u3"]
    assert torch.equal(parts[2].channel_weights, b.channel_weights[:, 4:6])
    sel = b.select(torch.tensor([True, False, True, False, False, True]))
    assert sel.meta["uid"] == ["u0", "u2", "u5"]
    assert torch.equal(sel.response_ids, b.response_ids[[0, 2, 5]])
    with pytest.raises(ValueError, match="cannot split"):
        b.split(4)


def test_concat_repads_prompts_left_and_responses_right():
    a, b = make_batch(B=2, P=3, R=4, seed=1), make_batch(B=3, P=5, R=2, seed=2)
    c = Batch.concat([a, b], pad_token_id=0)
    c.validate()
    assert c.prompt_ids.shape == (5, 5) and c.response_ids.shape == (5, 4)
    assert torch.equal(c.prompt_ids[:2, 2:], a.prompt_ids) and (c.prompt_ids[:2, :2] == 0).all()
    assert not c.prompt_mask[:2, :2].any()
    assert torch.equal(c.response_ids[2:, :2], b.response_ids) and not c.response_mask[2:, 2:].any()
    assert torch.equal(c.channel_weights[:, :2], a.channel_weights)
    assert c.meta["uid"] == a.meta["uid"] + b.meta["uid"]
    # the token count is preserved by concatenation
    assert c.num_response_tokens() == a.num_response_tokens() + b.num_response_tokens()


def test_validate_names_the_bad_field():
    b = make_batch()
    b.advantages = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="Batch.advantages"):
        b.validate()
    b = make_batch()
    b.channel_names = ("pg", "kl")
    with pytest.raises(ValueError, match="channel_weights"):
        b.validate()


def test_position_ids_skip_left_padding():
    b = make_batch(B=1, P=4, R=2)
    b.prompt_mask = torch.tensor([[False, False, True, True]])
    b.response_mask = torch.tensor([[True, True]])
    assert b.position_ids().tolist() == [[0, 0, 0, 1, 2, 3]]


def with_teacher(b: Batch, K: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    B, R = len(b), b.response_len
    return Batch(**{**b.to_dict(), "channel_norms": ("token",) * len(b.channel_names),
                    "teacher_topk_ids": torch.randint(0, 50, (B, R, K), generator=g),
                    "teacher_topk_logprobs": -torch.rand(B, R, K, generator=g),
                    "teacher_logprobs": -torch.rand(B, R, generator=g)})


def test_teacher_fields_and_channel_norms_follow_select_split_and_concat():
    b = with_teacher(make_batch(B=6, channels=("pg", "fkl:key")))
    b.validate()
    part = b.split(3)[1]
    assert part.channel_norms == ("token", "token")
    assert torch.equal(part.teacher_topk_ids, b.teacher_topk_ids[2:4])
    assert torch.equal(part.teacher_logprobs, b.teacher_logprobs[2:4])
    x = with_teacher(make_batch(B=2, R=4, seed=1, channels=("pg", "fkl:key")), seed=1)
    y = with_teacher(make_batch(B=3, R=2, seed=2, channels=("pg", "fkl:key")), seed=2)
    c = Batch.concat([x, y])
    c.validate()
    assert c.teacher_topk_ids.shape == (5, 4, 3) and c.teacher_logprobs.shape == (5, 4)
    assert torch.equal(c.teacher_topk_logprobs[2:, :2], y.teacher_topk_logprobs)
    assert (c.teacher_topk_ids[2:, 2:] == 0).all() and (c.teacher_logprobs[2:, 2:] == 0).all()
    assert c.channel_norms == ("token", "token")
    other = Batch(**{**y.to_dict(), "channel_norms": ("agg", "seq")})
    with pytest.raises(ValueError, match="different channel_norms"):
        Batch.concat([x, other])
    k4 = with_teacher(make_batch(B=3, R=2, seed=2, channels=("pg", "fkl:key")), K=4)
    with pytest.raises(ValueError, match="teacher_topk_ids with different K"):
        Batch.concat([x, k4])


@pytest.mark.parametrize("change, match", [
    ({"channel_norms": ("token",)}, "channel_norms has 1 entries for 2"),
    ({"channel_norms": ("token", "mean")}, "channel_norms has \\['mean'\\]"),
    ({"teacher_topk_logprobs": None}, "must be set together"),
    ({"teacher_topk_ids": torch.zeros(6, 5, dtype=torch.long)}, "teacher_topk_ids has shape \\(6, 5\\)"),
    ({"teacher_topk_logprobs": torch.zeros(6, 5, 2)}, "must have the same shape"),
    ({"teacher_topk_ids": torch.zeros(6, 5, 3)}, "integer token ids"),
    ({"teacher_logprobs": torch.zeros(6, 4)}, "Batch.teacher_logprobs has shape"),
])
def test_validate_checks_the_teacher_fields_and_norms(change, match):
    b = with_teacher(make_batch(B=6, channels=("pg", "fkl:key")))
    bad = Batch(**{**b.to_dict(), **change})
    with pytest.raises(ValueError, match=match):
        bad.validate()
