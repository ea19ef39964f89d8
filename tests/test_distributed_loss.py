"""The stage-1 contrastive loss over the GLOBAL batch: two gloo processes with unequal batches give the loss and
(after DDP-style gradient averaging) the gradients of one process holding the whole batch."""

import torch
import torch.multiprocessing as mp

from m2d2_hf.modeling_m2d2_pretraining import global_clap_loss


def whole_batch():
    torch.manual_seed(0)
    audio, text = torch.randn(5, 8), torch.randn(5, 8)
    valid = torch.tensor([True, True, False, True, True])
    return audio, text, valid, torch.tensor(2.0)


def worker(rank: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    audio, text, valid, scale = whole_batch()
    part = slice(0, 3) if rank == 0 else slice(3, 5)  # unequal: 3 and 2 clips
    a, t = audio[part].clone().requires_grad_(), text[part].clone().requires_grad_()
    loss = global_clap_loss(a, t, scale, valid[part])
    loss.backward()
    results[rank] = (loss.item(), a.grad / 2, t.grad / 2)  # DDP averages gradients over the 2 processes
    torch.distributed.destroy_process_group()


def test_global_batch_loss_and_gradients(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    audio, text, valid, scale = whole_batch()
    audio.requires_grad_(), text.requires_grad_()
    expected = global_clap_loss(audio, text, scale, valid)
    expected.backward()
    for rank, part in ((0, slice(0, 3)), (1, slice(3, 5))):
        loss, audio_grad, text_grad = results[rank]
        assert abs(loss - expected.item()) < 1e-6
        torch.testing.assert_close(audio_grad, audio.grad[part], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text_grad, text.grad[part], rtol=1e-5, atol=1e-6)
    assert audio.grad[2].abs().sum() == 0  # the caption-less clip takes no part
