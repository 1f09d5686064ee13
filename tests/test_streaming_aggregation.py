"""Streaming aggregation: the server folds each upload into a running weighted sum as it arrives, and gets what the
method's batch `aggregate` gets from all uploads at once."""

from __future__ import annotations

import pytest
import torch
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer
from hf_fedlora.federation.adapter_state import adapter_parameters, parameters_of
from hf_fedlora.methods import CONFIG_CLASSES, FederatedMethod, WeightedMeanAccumulator


def random_uploads(model, method: FederatedMethod, round_index: int, sub_round: int, count: int, seed: int):
    """`count` uploads shaped as the method sends them in that (sub-)round, with random values."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        k: p.shape
        for k, p in parameters_of(adapter_parameters(model), method.uploaded_factors(round_index, sub_round)).items()
    }
    return [{k: torch.randn(shape, generator=generator) for k, shape in shapes.items()} for _ in range(count)]


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES, ids=[c.method_class.name for c in CONFIG_CLASSES])
def test_streaming_and_batch_aggregation_agree_for_every_method(config_cls):
    """Every registered method streams (its aggregation is a weighted mean), and the stream equals `aggregate`."""
    model = tiny_peft(config_cls)
    method = config_cls(r=4, target_modules=["query", "value"]).build_method()
    weights = [3.0, 120.0, 1.0, 57.0, 9.0]
    for round_index in range(2):
        for sub_round in range(method.num_sub_rounds(round_index)):
            uploads = random_uploads(model, method, round_index, sub_round, len(weights), seed=round_index)
            streaming = method.streaming_aggregator()
            assert streaming is not None
            for upload, weight in zip(uploads, weights, strict=True):
                streaming.add(upload, weight)
            streamed, batch = streaming.result(), method.aggregate(uploads, weights)
            assert set(streamed) == set(batch) and batch
            for key in batch:
                assert streamed[key].dtype == batch[key].dtype
                torch.testing.assert_close(streamed[key], batch[key], rtol=1e-5, atol=1e-6)


def test_accumulator_is_the_weighted_mean_and_keeps_the_dtype():
    """Checked against a hand-computed mean: (1*a + 3*b) / 4, returned in the uploads' dtype."""
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -2.0])
    accumulator = WeightedMeanAccumulator()
    accumulator.add({"x": a.to(torch.bfloat16)}, 1.0)
    accumulator.add({"x": b.to(torch.bfloat16)}, 3.0)
    result = accumulator.result()["x"]
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result.float(), (a + 3 * b) / 4)


def test_accumulator_refuses_mismatched_uploads_and_empty_rounds():
    accumulator = WeightedMeanAccumulator()
    with pytest.raises(ValueError, match="no client uploaded"):
        accumulator.result()
    accumulator.add({"x": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="same tensors"):
        accumulator.add({"y": torch.zeros(2)}, 1.0)


def run(tmp_path, config_cls, streaming: bool):
    trainer = FederatedTrainer(
        tiny_peft(config_cls),
        fed_args(tmp_path / str(streaming), num_clients=4, clients_per_round=3, partition="dirichlet"),
        train_dataset=toy_dataset(80),
    )
    calls = []
    aggregate = trainer.method.aggregate

    def recording(uploads, weights):
        calls.append(len(uploads))
        return aggregate(uploads, weights)

    trainer.method.aggregate = recording
    if not streaming:
        trainer.method.streaming_aggregator = lambda: None  # a method that asks for all uploads at once
    trainer.train()
    return {k: v.clone() for k, v in trainer.global_state().items()}, calls


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES, ids=[c.method_class.name for c in CONFIG_CLASSES])
def test_trainer_streams_and_a_method_may_still_ask_for_all_uploads(tmp_path, config_cls):
    """The trainer folds uploads as they arrive (never calling the batch aggregate); a method whose
    streaming_aggregator() is None gets every upload of the (sub-)round at once. Both give the same adapter."""
    streamed, streamed_calls = run(tmp_path, config_cls, streaming=True)
    batch, batch_calls = run(tmp_path, config_cls, streaming=False)
    assert streamed_calls == []
    assert batch_calls and set(batch_calls) == {3}
    for key in batch:
        torch.testing.assert_close(streamed[key], batch[key], rtol=1e-5, atol=1e-6)
