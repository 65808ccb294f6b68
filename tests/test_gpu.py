"""CUDA checks (skipped without a GPU): fp32 exactness and bf16 agreement of paired decoding with the
teacher-forced forward, on the tiny pair."""

import pytest
import torch
from conftest import make_pair

from flythinker_worker import FlyThinker, PairedDecoder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-3), (torch.bfloat16, 0.15)])
def test_decoding_matches_teacher_forcing_on_cuda(dtype, atol):
    generator, reasoner, tok = make_pair()
    model = FlyThinker(generator, reasoner, lam=1.0).to("cuda", dtype).eval()
    torch.manual_seed(0)
    prompt = torch.randint(3, len(tok), (2, 12), device="cuda")
    out = PairedDecoder(model).generate(prompt, max_new_tokens=16, output_logits=True)
    with torch.no_grad():
        forced = model(out.sequences).logits[:, 11:-1].float()
    assert (out.logits - forced).abs().max() < atol
    # Greedy agreement: every decoded token is the teacher-forced argmax or within bf16 noise of it.
    top2 = forced.topk(2, dim=-1).values
    ambiguous = (top2[..., 0] - top2[..., 1]) < 2 * atol
    agree = out.sequences[:, 12:] == forced.argmax(-1)
    assert bool((agree | ambiguous).all())
