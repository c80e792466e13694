"""The test-only MTP reference (tests/mtp_reference.py) on tiny checkpoints with one MTP layer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.mtp_reference import MtpReference, mtp_logits  # noqa: E402

IDS = torch.randint(2, 200, (40,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(params=["tiny_dsa_mtp", "tiny_glm4_mtp"])
def ckpt(request):
    return request.getfixturevalue(request.param)


def test_shape_and_differs_from_the_main_model(ckpt):
    ref = MtpReference(ckpt)
    logits, out = ref.forward(IDS)
    v = ref.main.config.vocab_size
    assert logits.shape == (len(IDS), v) and logits.dtype == torch.float32
    assert out.shape == (len(IDS), ref.main.config.hidden_size)
    assert torch.isfinite(logits).all()
    main = ref.main_logits(IDS)
    assert (logits - main).abs().max() > 1.0  # a different block, not the main head's output
    assert (logits.argmax(-1) == main.argmax(-1)).float().mean() < 0.5  # random weights
    assert torch.equal(mtp_logits(ckpt, IDS), logits)


def test_position_zero_sees_nothing_and_rows_are_causal(ckpt):
    """x_0 = eh_proj(0) whatever t_0 is, so logits_0 is the same for every sequence; row q
    depends on tokens 0..q only (t_q through e_q, t_{<q} through g_q and attention)."""
    ref = MtpReference(ckpt)
    full, _ = ref.forward(IDS)
    other = [IDS[0] + 1] + IDS[1:]
    changed, _ = ref.forward(other)
    assert torch.equal(changed[0], full[0])  # t_0 is not an input of position 0
    assert (changed[1] - full[1]).abs().max() > 1e-2  # ... but of position 1 (via g_1, attn)
    head, _ = ref.forward(IDS[:17])
    torch.testing.assert_close(head, full[:17], atol=1e-4, rtol=1e-4)
    last = IDS[:16] + [IDS[16] + 1]
    moved, _ = ref.forward(last)
    torch.testing.assert_close(moved[:16], full[:16], atol=1e-4, rtol=1e-4)
    assert (moved[16] - full[16]).abs().max() > 1e-2  # t_q enters position q through e_q


def test_hidden_input_is_the_main_post_norm_state_shifted_by_one(ckpt):
    ref = MtpReference(ckpt)
    h = ref.main_hidden(IDS)
    # transformers' last_hidden_state is after the final norm: the LM head reads it as is
    torch.testing.assert_close(h @ ref.main.lm_head.weight.T, ref.main_logits(IDS))
    g = torch.cat([torch.zeros_like(h[:1]), h[:-1]])
    default, _ = ref.forward(IDS)
    assert torch.equal(ref.forward(IDS, g=g)[0], default)
    zeros, _ = ref.forward(IDS, g=torch.zeros_like(h))
    assert torch.equal(zeros[0], default[0]) and (zeros[1:] - default[1:]).abs().max() > 1e-2


def test_a_checkpoint_without_mtp_is_refused(tiny_glm4):
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        MtpReference(tiny_glm4)
