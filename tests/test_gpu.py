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


def test_fsdp2_bf16_step_on_cuda_matches_fp32(monkeypatch):
    """Our FSDP2 layout (each decoder layer of both LMs, then one root over FlyThinker) on one GPU with
    NCCL and the bf16 MixedPrecisionPolicy: the first backward used to crash when the root resharded
    after forward ("setStorage ... storage of size 0" on the tied embedding). Step-1 loss must match an
    unsharded fp32 forward of the same weights, and three AdamW steps stay finite."""
    import socket

    import torch.distributed as dist

    from flythinker_worker.sharding import init_distributed, shard_flythinker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    generator, reasoner, tok = make_pair()
    torch.manual_seed(0)
    ids = torch.randint(3, len(tok), (2, 24), device="cuda")
    labels = ids.clone()
    labels[:, :8] = -100
    reference = FlyThinker(generator, reasoner, lam=1.0).to("cuda")
    with torch.no_grad():
        expected = float(reference(ids, labels=labels).loss)
    device = init_distributed("cuda")
    try:
        model = shard_flythinker(reference, "cuda", torch.bfloat16, cpu_offload=False,
                                 reshard_after_forward=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses = []
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss = model(ids.to(device), labels=labels.to(device)).loss
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        assert abs(losses[0] - expected) / expected < 1e-2
        assert all(torch.isfinite(torch.tensor(losses)))
    finally:
        dist.destroy_process_group()
