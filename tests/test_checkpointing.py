"""Checkpointing every n-th block and offloading checkpoint inputs: the loss and every LoRA gradient equal the
plain run's, on tiny FLUX.2 and FLUX.1 transformers with LoRA in every block."""

from __future__ import annotations

import pytest
import torch

from tests.test_tread import BUILDERS, Family
from trainer.memory.checkpointing import ActivationOffloader, enable_block_checkpointing
from trainer.tread import transformer_blocks


def _step(family: Family, steps: int = 1) -> tuple[list[float], dict[str, torch.Tensor]]:
    """`steps` plain SGD steps on the LoRA; returns the losses and the last step's gradients."""
    params = [p for p in family.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = family().pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in family.transformer.named_parameters() if p.requires_grad}
        optimizer.step()
    return losses, grads


@pytest.fixture(params=sorted(BUILDERS))
def family_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize(("interval", "always", "offload"), [
    (1, (), False), (2, (), False), (3, (1,), False), (1, (), True), (2, (0, 1), True)])
def test_checkpointing_variants_match_the_plain_run(family_name: str, interval: int, always: tuple[int, ...],
                                                    offload: bool) -> None:
    plain_losses, plain_grads = _step(BUILDERS[family_name](lora=True), steps=2)
    family = BUILDERS[family_name](lora=True)
    offloader = ActivationOffloader(torch.device("cpu")) if offload else None
    enable_block_checkpointing(family.transformer, transformer_blocks(family.transformer), interval, always,
                               offloader)
    losses, grads = _step(family, steps=2)
    assert losses == pytest.approx(plain_losses, abs=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if offloader is not None:
        assert offloader.bytes_offloaded > 0
        assert not offloader._pending  # every stored input came back in the backward


def test_offloaded_checkpoint_replays_lora_dropout(family_name: str) -> None:
    """Dropout inside the LoRA draws the same mask in the recomputation as in the forward."""
    from peft import LoraConfig

    def build() -> Family:
        family = BUILDERS[family_name](lora=False)
        family.transformer.requires_grad_(False)
        family.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"],
                                                  lora_dropout=0.5, init_lora_weights=False))
        return family

    plain = build()
    torch.manual_seed(3)
    plain_losses, plain_grads = _step(plain)
    family = build()
    enable_block_checkpointing(family.transformer, transformer_blocks(family.transformer), 1, (),
                               ActivationOffloader(torch.device("cpu")))
    torch.manual_seed(3)
    losses, grads = _step(family)
    assert losses == pytest.approx(plain_losses, abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_only_the_chosen_blocks_are_checkpointed(family_name: str) -> None:
    family = BUILDERS[family_name](lora=True)
    blocks = transformer_blocks(family.transformer)
    calls: list[int] = []
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    enable_block_checkpointing(family.transformer, blocks, interval=3, always=(4,))
    family().pow(2).mean().backward()
    recomputed = sorted(i for i in set(calls) if calls.count(i) == 2)
    assert recomputed == [0, 3, 4, 6]


def test_the_backward_brings_back_the_whole_previous_block_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a block starts its recomputation, both streams it stored (a double block's image and text hidden
    states) are already on their way back, started by the block after it: none waits to be asked for."""
    family = BUILDERS["flux2"](lora=True)
    offloader = ActivationOffloader(torch.device("cpu"))
    enable_block_checkpointing(family.transformer, transformer_blocks(family.transformer), 1, (), offloader)
    late: list[int] = []
    bring_back = ActivationOffloader.bring_back

    def watched(self: ActivationOffloader, block: int) -> None:
        first = block == self._blocks  # the forward's last block, the backward's first: nothing after it
        late.extend(s.block for s in self._pending if s.block == block and s.loaded is None and not first)
        bring_back(self, block)

    monkeypatch.setattr(ActivationOffloader, "bring_back", watched)
    _step(family, steps=1)
    assert offloader._blocks >= 4 and not offloader._pending  # double and single blocks, every input came back
    assert late == []
