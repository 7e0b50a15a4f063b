import pytest
import torch

from fusedlm import ops
from tiny_models import fused

from fusedlm.models import get_config


def _ids(b=2, n=7, vocab=128, seed=0):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["bert-tiny", "roberta-tiny"])
def test_mlm_loss_and_padding(name):
    model = fused(name, perturb=())
    ids = _ids()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    out = model(ids, attention_mask=mask, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 2], ids[:, 2])
    torch.testing.assert_close(out.loss, expected)
    # padded keys are invisible: changing a pad token leaves the real tokens' outputs alone
    ids2 = ids.clone()
    ids2[1, 6] = (ids2[1, 6] + 1) % 128
    torch.testing.assert_close(model(ids2, attention_mask=mask).logits[1, :5], out.logits[1, :5])


def test_classifier_head():
    model = fused("bert-tiny", head="classifier", pooler=True, n_labels=3, perturb=())
    out = model(_ids(), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.pooled.shape == (2, 64)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="pooler"):
        get_config("bert-tiny", head="classifier", pooler=False)


@pytest.mark.parametrize("name", ["t5-tiny", "bart-tiny"])
def test_seq2seq_loss_generate_and_cache(name):
    model = fused(name, perturb=())
    src, tgt = _ids(), _ids(n=5, seed=1)
    out = model(src, labels=tgt)
    assert out.logits.shape == (2, 5, 128)
    dec = model.shift_right(tgt)
    assert dec[0, 0] == model.config.decoder_start_token_id and torch.equal(dec[:, 1:], tgt[:, :-1])
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits.reshape(-1, 128), tgt.reshape(-1)))
    gen = model.generate(src, 6, eos_token_id=[])  # no eos: transformers would stop at config.eos_token_id
    # greedy without the cache: run the decoder on the whole prefix each step
    seq = gen[:, :1]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(src, decoder_input_ids=seq).logits[:, -1:].argmax(-1)], 1)
    assert gen.tolist() == seq.tolist()
    with pytest.raises(ValueError, match="vocab_size"):
        model(src, decoder_input_ids=torch.tensor([[128]]).expand(2, 1))


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_backends_agree(name):
    """The model calls only ops.attention: the reference and cpu backends give the same logits."""
    model = fused(name, perturb=())
    ids = _ids(3, 9)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad(), ops.use_backend("reference"):
        ref = model(ids, attention_mask=mask).logits
    if "cpu" not in ops.available_backends():
        pytest.skip("fusedlm._C is not built")
    with torch.no_grad(), ops.use_backend("cpu"):
        cpu = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(cpu[mask], ref[mask], atol=1e-5, rtol=1e-5)
