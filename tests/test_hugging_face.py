"""Hugging Face models that compute their own loss, trained as their users do
(``model(**batch).loss``, no loss function given to Ikkuna): a tiny GPT-2 and a tiny BERT
built from configurations, on the CPU. The loss, output and label topics come from the
model's output (``loss``, ``logits``) and the ``labels=`` keyword; ``train_accuracy`` of
sequence logits with padding and GPT-2's label shift equals a manual computation; the tied
embedding / output layer is one parameter; ``include`` takes the dotted class path of
transformers' ``Conv1D``."""

from __future__ import annotations

import warnings

import pytest
import torch

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
VOCAB = 100


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).to(CPU)


def _lm_batch(step: int) -> dict[str, torch.Tensor]:
    """Token ids with right padding on two rows; padded labels are -100, as a data collator
    for causal language modelling makes them."""
    g = torch.Generator().manual_seed(step)
    input_ids = torch.randint(1, VOCAB, (4, 12), generator=g, device=CPU)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 9:] = 0
    attention_mask[2, 5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """By hand: position t predicts token t + 1; padding (-100) is not counted."""
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    counted = target != -100
    return float(((predicted == target) & counted).sum()) / float(counted.sum())


def test_gpt2_with_its_own_loss_publishes_loss_outputs_labels_and_accuracy(
    installed_plugins, recorder_cls
):
    model = _gpt2()
    config = {
        "plugins": ["accuracy"], "backends": [], "on_error": "raise",
        "subscribers": [{"name": "train_accuracy", "shift_labels": True}, {"name": "loss"}],
    }
    exporter = ik.watch(model, config=config)  # no loss function: the model computes it
    recorder = exporter.bus.register_subscriber(recorder_cls(
        topics=["loss", "network_output", "input_labels", "input_data", "weight_updates"]
    ))
    backend = exporter.bus.add_backend(MemoryBackend())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte  # tied, as GPT-2 is
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "no loss function" warning
        for step in range(3):
            batch = _lm_batch(step)
            opt.zero_grad()
            outputs = model(**batch)
            outputs.loss.backward()
            before = wte.detach().clone()
            opt.step()
            exporter.bus.flush()
            seen = recorder.seen
            torch.testing.assert_close(seen[("loss", None, step)], outputs.loss.detach())
            assert torch.equal(seen[("network_output", None, step)], outputs.logits.detach())
            assert torch.equal(seen[("input_labels", None, step)], batch["labels"])
            assert torch.equal(seen[("input_data", None, step)], batch["input_ids"])
            assert backend.scalar("loss/loss", step) == pytest.approx(outputs.loss.item())
            assert backend.scalar("train_accuracy", step) == pytest.approx(
                _next_token_accuracy(outputs.logits.detach(), batch["labels"])
            )
            # the tied embedding is one parameter: one update, after - before
            torch.testing.assert_close(seen[("weight_updates", "transformer.wte", step)],
                                       wte.detach() - before)
    assert not any(key.startswith("lm_head") for _, key, _ in recorder.seen if key)
    exporter.close()


def test_include_takes_a_dotted_class_path(recorder_cls):
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    exporter = ik.watch(model, config={
        "backends": [], "on_error": "raise", "include": ["transformers.pytorch_utils.Conv1D"],
    })
    recorder = exporter.bus.register_subscriber(recorder_cls(topics=["weight_gradients"]))
    conv1d = {name: m for name, m in model.named_modules() if isinstance(m, Conv1D)}
    assert set(exporter.modules) == set(conv1d) and len(conv1d) == 8
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = _lm_batch(0)
    opt.zero_grad()
    model(**batch).loss.backward()
    grads = {name: m.weight.grad.clone() for name, m in conv1d.items()}
    opt.step()
    exporter.close()
    assert {key for _, key, _ in recorder.seen} == set(conv1d)
    for name, grad in grads.items():
        assert torch.equal(recorder.seen[("weight_gradients", name, 0)], grad)


def test_bert_classifier_with_its_own_loss(installed_plugins):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )).to(CPU)
    exporter = ik.watch(model, config={
        "plugins": ["accuracy"], "backends": [], "on_error": "raise",
        "subscribers": [{"name": "train_accuracy"}, {"name": "loss"}],
    })
    backend = exporter.bus.add_backend(MemoryBackend())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        batch = {
            "input_ids": torch.randint(1, VOCAB, (6, 10), generator=g, device=CPU),
            "attention_mask": torch.ones(6, 10, dtype=torch.long, device=CPU),
            "labels": torch.randint(0, 3, (6,), generator=g, device=CPU),
        }
        opt.zero_grad()
        outputs = model(**batch)
        outputs.loss.backward()
        opt.step()
        exporter.bus.flush()
        assert backend.scalar("loss/loss", step) == pytest.approx(outputs.loss.item())
        hits = (outputs.logits.argmax(-1) == batch["labels"]).float().mean().item()
        assert backend.scalar("train_accuracy", step) == pytest.approx(hits)
    exporter.close()
