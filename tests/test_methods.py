"""The federated LoRA methods: what trains, what is sent, and how the server combines it.

Covers FFA-LoRA (A frozen at its shared seeded init, only B trains and is sent) against the
DP-LoRA / FedIT baseline (`FedLoraConfig`: A and B train and are averaged separately), as
specified in docs/algorithms.md (#lora, #ffa-lora), plus the config classes' user-facing contract and the
method registry.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from peft import LoraConfig, PeftType, get_peft_model
from tiny import fed_args, tiny_bert, tiny_peft, toy_dataset
from toy_method import ToyConfig, ToyMethod, registered_toy

import hf_fedlora.methods as methods_module
from hf_fedlora import FederatedTrainer, FederatedTrainingArguments, FedLoraConfig, FFALoraConfig
from hf_fedlora.comparison import (
    DEFAULT_LEARNING_RATES,
    RECIPE_METHOD_SETTINGS,
    default_learning_rate,
    method_names,
    recipe_settings,
)
from hf_fedlora.federation.adapter_state import adapter_parameters, payload_nbytes
from hf_fedlora.methods import CONFIG_CLASSES, DefaultLearningRate, register_method, unregister_method


class RecordingTrainer(FederatedTrainer):
    """A FederatedTrainer that records, per client update, the upload and the model's adapter right after local work."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []

    def local_round(self, name, round_index, sub_round, steps):
        upload, losses = super().local_round(name, round_index, sub_round, steps)
        # The model holds this client's locally trained adapter at this moment.
        self.records.append(
            {
                "client": name,
                "round": round_index,
                "sub_round": sub_round,
                "upload": upload,
                "lora_A": lora_tensors(self.model, "lora_A"),
                "lora_B": lora_tensors(self.model, "lora_B"),
            }
        )
        return upload, losses


def lora_tensors(model, factor: str) -> dict[str, torch.Tensor]:
    """Detached copies of the model's `factor` ("lora_A" / "lora_B") parameters, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if f".{factor}." in name}


def head_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters() if ".modules_to_save." in name}


def adapted_layers(model) -> list[tuple[str, str]]:
    """(A name, B name) of every adapted layer."""
    a_names = sorted(name for name, _ in model.named_parameters() if ".lora_A." in name)
    return [(a_name, a_name.replace(".lora_A.", ".lora_B.")) for a_name in a_names]


def split_clients(sizes, seed=0):
    """Ready-made clients (a list of datasets) with the given example counts."""
    data = toy_dataset(n=sum(sizes), seed=seed)
    clients, start = [], 0
    for size in sizes:
        clients.append(data.select(range(start, start + size)))
        start += size
    return clients


# --------------------------------------------------------------------------------------
# 1. FFA-LoRA: A frozen forever, only B (and the head) is sent
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("private", [False, True], ids=["non_private", "dp"])
def test_ffa_lora_keeps_A_frozen_and_uploads_only_B_and_head(tmp_path, private):
    """FFA-LoRA: lora_A never moves (globally or on any client, with or without DP); uploads carry only B and head."""
    overrides = {"dp_target_epsilon": 8.0} if private else {}
    model = tiny_peft(FFALoraConfig)
    # weight decay would move a frozen-but-optimised A, so turn it on to make the promise harder to keep
    trainer = RecordingTrainer(
        model=model,
        args=fed_args(tmp_path, num_rounds=2, local_steps=3, weight_decay=0.1, **overrides),
        train_dataset=toy_dataset(120),
    )
    initial_A = lora_tensors(model, "lora_A")
    initial_B = lora_tensors(model, "lora_B")
    initial_head = {n: p.detach().clone() for n, p in model.named_parameters() if n in head_names(model)}
    assert initial_A and initial_B and initial_head

    metrics = trainer.train().metrics
    assert trainer.privacy.enabled is private
    assert ("epsilon" in metrics) is private

    # every client, after its local training, still holds the shared initial A
    assert len(trainer.records) == 2 * 2  # 2 rounds x 2 clients
    for record in trainer.records:
        assert record["lora_A"].keys() == initial_A.keys()
        for name, value in record["lora_A"].items():
            assert torch.equal(value, initial_A[name]), f"{record['client']} round {record['round']}: {name} moved"
        # ... while its B did train
        assert any(not torch.equal(record["lora_B"][n], initial_B[n]) for n in initial_B)

    # the global model: A bit-identical, B and head changed
    for name, value in lora_tensors(model, "lora_A").items():
        assert torch.equal(value, initial_A[name]), f"global {name} moved"
    final_B = lora_tensors(model, "lora_B")
    assert all(not torch.equal(final_B[n], initial_B[n]) for n in initial_B), "some global lora_B never trained"
    final_head = {n: p.detach() for n, p in model.named_parameters() if n in initial_head}
    assert any(not torch.equal(final_head[n], initial_head[n]) for n in initial_head)

    # uploads: exactly the B factors and the head, never an A
    expected_keys = set(initial_B) | set(initial_head)
    for record in trainer.records:
        upload = record["upload"]
        assert upload is not None
        assert not [key for key in upload if "lora_A" in key]
        assert set(upload) == expected_keys


# --------------------------------------------------------------------------------------
# 2. The shared seeded init of A
# --------------------------------------------------------------------------------------
def test_same_init_seed_gives_same_A_across_separately_built_models(tmp_path):
    """Two processes that build their own model with the same init_seed hold the same lora_A; another seed differs."""
    models = [tiny_peft(FFALoraConfig, seed=seed, init_seed=init_seed) for seed, init_seed in [(1, 7), (2, 7), (3, 8)]]
    before = [lora_tensors(m, "lora_A") for m in models]
    # PEFT's own init (from the global RNG) differs between the models: the trainer must be what aligns them
    assert any(not torch.equal(before[0][n], before[1][n]) for n in before[0])
    # and the base models really are different models
    assert not torch.equal(
        models[0].get_base_model().bert.embeddings.word_embeddings.weight,
        models[1].get_base_model().bert.embeddings.word_embeddings.weight,
    )

    for i, model in enumerate(models):
        FederatedTrainer(model=model, args=fed_args(tmp_path / str(i)), train_dataset=toy_dataset(40))
    same_a, same_b, other = (lora_tensors(m, "lora_A") for m in models)

    assert same_a.keys() == same_b.keys() == other.keys()
    for name in same_a:
        assert torch.equal(same_a[name], same_b[name]), f"{name} differs for the same init_seed"
        assert not torch.equal(same_a[name], other[name]), f"{name} is the same for different init_seeds"
    # the layers do not all share one matrix: the seed drives one stream through all of them
    names = sorted(same_a)
    assert not torch.equal(same_a[names[0]], same_a[names[1]])


# --------------------------------------------------------------------------------------
# 3. Payload size
# --------------------------------------------------------------------------------------
def first_upload(config_cls, tmp_path, target_modules):
    model = tiny_peft(config_cls, target_modules=target_modules)
    trainer = RecordingTrainer(
        model=model, args=fed_args(tmp_path, num_rounds=1, local_steps=1), train_dataset=toy_dataset(40)
    )
    trainer.train()
    return model, trainer.records[0]["upload"]


def lora_part(upload):
    return {key: value for key, value in upload.items() if "lora_" in key}


def test_ffa_lora_upload_is_half_of_lora_when_adapted_layers_are_square(tmp_path):
    """On square adapted layers (query/value of the tiny BERT) FFA-LoRA's LoRA payload is exactly half of LoRA's."""
    _, ffa = first_upload(FFALoraConfig, tmp_path / "ffa", ["query", "value"])
    _, lora = first_upload(FedLoraConfig, tmp_path / "lora", ["query", "value"])
    ffa_bytes, lora_bytes = payload_nbytes(lora_part(ffa)), payload_nbytes(lora_part(lora))
    assert ffa_bytes > 0
    assert 2 * ffa_bytes == lora_bytes
    # the head is sent by both, unchanged in size
    heads = {k: v for k, v in ffa.items() if "lora_" not in k}
    assert heads and payload_nbytes(heads) == payload_nbytes({k: v for k, v in lora.items() if "lora_" not in k})


def test_ffa_lora_upload_is_the_B_share_of_lora_on_non_square_layers(tmp_path):
    """In general FFA-LoRA sends out*r per layer and LoRA (in+out)*r: checked where the layers are not square."""
    targets = ["query", "intermediate.dense"]  # 16 -> 16 and 16 -> 32
    model, ffa = first_upload(FFALoraConfig, tmp_path / "ffa", targets)
    _, lora = first_upload(FedLoraConfig, tmp_path / "lora", targets)
    r, itemsize = 4, torch.finfo(torch.float32).bits // 8
    shapes = [
        (module.base_layer.in_features, module.base_layer.out_features)
        for name, module in model.named_modules()
        if name.endswith(("query", "intermediate.dense")) and hasattr(module, "base_layer")
    ]
    assert len(shapes) == 4 and any(n != m for n, m in shapes)  # 2 layers x 2 targets, some non-square
    assert payload_nbytes(lora_part(ffa)) == sum(m * r for _, m in shapes) * itemsize
    assert payload_nbytes(lora_part(lora)) == sum((n + m) * r for n, m in shapes) * itemsize
    assert 2 * payload_nbytes(lora_part(ffa)) != payload_nbytes(lora_part(lora))  # "half" is the square case only


# --------------------------------------------------------------------------------------
# 4. Aggregation under the LoRA baseline
# --------------------------------------------------------------------------------------
A_KEY = "base_model.model.layer.query.lora_A.default.weight"
B_KEY = "base_model.model.layer.query.lora_B.default.weight"
HEAD_KEY = "base_model.model.classifier.modules_to_save.default.weight"


def test_lora_aggregate_is_separate_weighted_means_with_renormalised_weights():
    """FedLoraConfig's server step is the weighted mean of A and, separately, of B (weights renormalised)."""
    method = FedLoraConfig(r=2, target_modules=["query"]).build_method()
    generator = torch.Generator().manual_seed(0)
    uploads = [
        {
            A_KEY: torch.randn(2, 3, generator=generator),
            B_KEY: torch.randn(3, 2, generator=generator),
            HEAD_KEY: torch.randn(2, 3, generator=generator),
        }
        for _ in range(3)
    ]
    weights = [10.0, 30.0, 60.0]  # not summing to one: renormalised to 0.1, 0.3, 0.6
    result = method.aggregate(uploads, weights)

    assert set(result) == {A_KEY, B_KEY, HEAD_KEY}
    for key in result:
        expected = 0.1 * uploads[0][key] + 0.3 * uploads[1][key] + 0.6 * uploads[2][key]
        assert result[key].shape == expected.shape
        torch.testing.assert_close(result[key], expected, rtol=1e-6, atol=1e-7)
    # the product of the means is not the mean of the products (what separate averaging gives up)
    mean_of_products = sum(p * u[B_KEY] @ u[A_KEY] for p, u in zip([0.1, 0.3, 0.6], uploads, strict=True))
    assert not torch.allclose(result[B_KEY] @ result[A_KEY], mean_of_products, atol=1e-3)


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_lora_round_averages_client_uploads_with_the_configured_weights(tmp_path, weighting):
    """After one non-private round the global A, B and head are the configured weighted mean of the clients' uploads."""
    sizes = [12, 36]  # unequal, so example-count and uniform weights give different means
    model = tiny_peft(FedLoraConfig)
    trainer = RecordingTrainer(
        model=model,
        args=fed_args(tmp_path, num_rounds=1, local_steps=2, aggregation_weights=weighting),
        train_dataset=split_clients(sizes),
    )
    trainer.train()
    uploads = [record["upload"] for record in trainer.records]
    assert len(uploads) == 2 and all(record["sub_round"] == 0 for record in trainer.records)

    weights = sizes if weighting == "num_examples" else [1, 1]
    other_weights = [1, 1] if weighting == "num_examples" else sizes
    global_state = dict(model.named_parameters())
    assert any("lora_A" in key for key in uploads[0]) and any("lora_B" in key for key in uploads[0])
    for key in uploads[0]:
        expected = sum(w * u[key] for w, u in zip(weights, uploads, strict=True)) / sum(weights)
        other = sum(w * u[key] for w, u in zip(other_weights, uploads, strict=True)) / sum(other_weights)
        actual = global_state[key].detach()
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=f"{key} is not the {weighting} mean")
        if not torch.equal(uploads[0][key], uploads[1][key]):  # the clients did diverge: the weighting matters
            assert not torch.allclose(actual, other, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(uploads[0][k], uploads[1][k]) for k in uploads[0] if "lora_B" in k)


# --------------------------------------------------------------------------------------
# 5. Aggregation deviation D = sum_k p_k B_k A_k - B_bar A_bar
# --------------------------------------------------------------------------------------
def test_ffa_lora_has_zero_aggregation_deviation_on_real_uploads(tmp_path):
    """Under FFA-LoRA the aggregated B_bar @ A equals the weighted mean of the clients' B_k @ A_k, for every layer."""
    sizes = [10, 20, 50]
    model = tiny_peft(FFALoraConfig)
    trainer = RecordingTrainer(
        model=model,
        args=fed_args(tmp_path, num_rounds=1, local_steps=3, num_clients=3),
        train_dataset=split_clients(sizes),
    )
    trainer.train()
    records = trainer.records
    assert len(records) == 3
    p = [size / sum(sizes) for size in sizes]
    global_params = dict(model.named_parameters())

    layers = adapted_layers(model)
    assert len(layers) == 4  # query and value in 2 layers
    for a_key, b_key in layers:
        assert b_key in global_params
        mean_update = sum(pk * rec["upload"][b_key] @ rec["lora_A"][a_key] for pk, rec in zip(p, records, strict=True))
        aggregated = global_params[b_key].detach() @ global_params[a_key].detach()
        assert mean_update.abs().max() > 0  # the clients did move B: the check is not 0 == 0
        torch.testing.assert_close(aggregated, mean_update, rtol=1e-5, atol=1e-6)
    # the clients' updates genuinely differ, so a wrong weighting would be caught
    b_key = layers[0][1]
    assert not torch.allclose(records[0]["upload"][b_key], records[2]["upload"][b_key])


def test_lora_aggregation_deviation_is_nonzero_and_matches_closed_form():
    """Under FedLoraConfig, averaging A and B separately leaves D = sum_k p_k (B_k - B_bar)(A_k - A_bar) != 0."""
    method = FedLoraConfig(r=2, target_modules=["query"]).build_method()
    generator = torch.Generator().manual_seed(1)
    uploads = [
        {A_KEY: torch.randn(2, 5, generator=generator), B_KEY: torch.randn(4, 2, generator=generator)} for _ in range(2)
    ]
    weights = [1.0, 3.0]
    p = [0.25, 0.75]
    result = method.aggregate(uploads, weights)
    a_bar, b_bar = result[A_KEY], result[B_KEY]

    deviation = sum(pk * u[B_KEY] @ u[A_KEY] for pk, u in zip(p, uploads, strict=True)) - b_bar @ a_bar
    closed_form = sum(pk * (u[B_KEY] - b_bar) @ (u[A_KEY] - a_bar) for pk, u in zip(p, uploads, strict=True))
    torch.testing.assert_close(deviation, closed_form, rtol=1e-5, atol=1e-5)
    assert deviation.norm() > 0.1 * (b_bar @ a_bar).norm()  # clearly non-zero, not rounding noise
    # ... and it vanishes when the clients share A (what FFA-LoRA enforces)
    shared = [{A_KEY: uploads[0][A_KEY], B_KEY: u[B_KEY]} for u in uploads]
    shared_result = method.aggregate(shared, weights)
    exact = sum(pk * u[B_KEY] @ u[A_KEY] for pk, u in zip(p, shared, strict=True))
    torch.testing.assert_close(shared_result[B_KEY] @ shared_result[A_KEY], exact, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# 6. The LoRA baseline trains and sends both factors
# --------------------------------------------------------------------------------------
def test_lora_baseline_trains_and_uploads_both_factors(tmp_path):
    """FedLoraConfig trains A and B together: both change, and every upload carries A, B and the head."""
    model = tiny_peft(FedLoraConfig)
    trainer = RecordingTrainer(
        model=model, args=fed_args(tmp_path, num_rounds=2, local_steps=3), train_dataset=toy_dataset(80)
    )
    initial_A, initial_B = lora_tensors(model, "lora_A"), lora_tensors(model, "lora_B")
    trainer.train()

    final_A, final_B = lora_tensors(model, "lora_A"), lora_tensors(model, "lora_B")
    assert all(not torch.equal(final_A[n], initial_A[n]) for n in initial_A), "some global lora_A never trained"
    assert all(not torch.equal(final_B[n], initial_B[n]) for n in initial_B), "some global lora_B never trained"
    expected_keys = set(initial_A) | set(initial_B) | head_names(model)
    for record in trainer.records:
        assert set(record["upload"]) == expected_keys
        assert any(not torch.equal(record["lora_A"][n], initial_A[n]) for n in initial_A)


# --------------------------------------------------------------------------------------
# 7. The config classes
# --------------------------------------------------------------------------------------
CONFIGS = [(FedLoraConfig, "lora"), (FFALoraConfig, "ffa_lora")]


@pytest.mark.parametrize(("config_cls", "method_name"), CONFIGS, ids=[name for _, name in CONFIGS])
def test_config_stays_plain_lora_on_disk_and_names_its_method(config_cls, method_name):
    """The config is a LORA config for plain PEFT (no federated field in to_dict); federated_dict names the method."""
    config = config_cls(r=4, target_modules=["query"], init_seed=5)
    assert isinstance(config, LoraConfig)
    assert config.peft_type == PeftType.LORA
    as_dict = config.to_dict()
    assert not set(config.federated_fields) & set(as_dict)
    assert as_dict["r"] == 4 and as_dict["peft_type"] == PeftType.LORA
    own_fields = {"lr_ratio_b": 1.0} if method_name == "ffa_lora" else {}
    assert config.federated_dict() == {"method": method_name, "init_seed": 5, **own_fields}
    assert config.build_method().name == method_name


def our_config_classes():
    classes = [
        obj
        for _, obj in inspect.getmembers(methods_module, inspect.isclass)
        if issubclass(obj, LoraConfig) and obj.__module__.startswith("hf_fedlora")
    ]
    assert FedLoraConfig in classes and FFALoraConfig in classes
    return classes


def test_every_declared_config_field_has_help():
    """Every dataclass field our config classes declare (beyond LoraConfig's) documents itself via help metadata."""
    checked = []
    for cls in our_config_classes():
        declared = set(vars(cls).get("__annotations__", {}))
        for field in dataclasses.fields(cls):
            if field.name in declared:
                checked.append(field.name)
                assert field.metadata.get("help", "").strip(), f"{cls.__name__}.{field.name} has no help"
    assert "init_seed" in checked


@pytest.mark.parametrize("config_cls", [FedLoraConfig, FFALoraConfig])
@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"init_seed": -1}, "init_seed"),
        ({"init_seed": True}, "init_seed"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": False}, "init_lora_weights"),  # B random: the model would not start at the base
    ],
)
def test_config_rejects_bad_values_naming_the_field(config_cls, kwargs, field_name):
    """Bad init_seed or an init_lora_weights the federated methods cannot use fails at construction, naming it."""
    with pytest.raises(ValueError, match=field_name):
        config_cls(r=4, target_modules=["query"], **kwargs)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_config_accepts_supported_inits(init):
    """The two supported inits construct fine (so the rejection above is specific)."""
    assert FFALoraConfig(r=4, target_modules=["query"], init_lora_weights=init).init_lora_weights == init


def test_missing_target_module_fails_with_its_name():
    """get_peft_model with a target module the model lacks fails with a ValueError naming that module."""
    with pytest.raises(ValueError, match="Target modules .*nope.* not found"):
        get_peft_model(tiny_bert(), FFALoraConfig(r=4, target_modules=["nope"]))
    # With a task head (modules_to_save), PEFT's message (not ours) points at the option instead of the name.
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(tiny_bert(), FFALoraConfig(r=4, target_modules=["nope"], task_type="SEQ_CLS"))


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES, ids=[c.method_class.name for c in CONFIG_CLASSES])
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_config_refuses_trainable_biases(config_cls, bias):
    """PEFT's bias='lora_only'/'all' would unfreeze biases that no method trains, sends or averages."""
    with pytest.raises(ValueError, match=f"bias={bias!r} is not supported.*bias='none'"):
        config_cls(r=4, target_modules=["query"], bias=bias)


def test_biases_peft_unfreezes_are_outside_the_federated_adapter_state():
    """Why the refusal above: with a plain LoraConfig(bias='lora_only') PEFT makes the adapted layers' biases
    trainable, but the adapter state a client trains, sends and receives holds only the LoRA factors and the head."""
    config = LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS", bias="lora_only")
    model = get_peft_model(tiny_bert(), config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    biases = {name for name in trainable if name.endswith("query.base_layer.bias")}
    assert len(biases) == 2  # one per layer of the tiny BERT
    assert not biases & set(adapter_parameters(model))
    assert trainable - biases == set(adapter_parameters(model))


# --------------------------------------------------------------------------------------
# 8. The registry: a method is one file and one register_method call
# --------------------------------------------------------------------------------------
def test_the_built_in_methods_keep_their_order_and_recipe():
    """Registration order, and the recipe each method class carries (the numbers of benchmarks/RESULTS.md)."""
    assert method_names() == ["lora", "ffa_lora", "rolora", "deer", "la_lora", "fedsvd"]
    assert [c.method_class.name for c in methods_module.CONFIG_CLASSES] == method_names()
    assert {name: rate.value for name, rate in DEFAULT_LEARNING_RATES.items()} == {
        "lora": 5e-3,
        "ffa_lora": 5e-2,
        "rolora": 2e-2,
        "deer": 1e-2,
        "la_lora": 5e-2,
        "fedsvd": 5e-2,
    }
    assert all(rate.tuned and "lr_sweep.py" in rate.source for rate in DEFAULT_LEARNING_RATES.values())
    assert dict(RECIPE_METHOD_SETTINGS) == {"ffa_lora": {"lr_ratio_b": 0.1}, "fedsvd": {"lr_ratio_b": 0.1}}
    assert recipe_settings("ffa_lora") == {"lr_ratio_b": 0.1} and recipe_settings("deer") == {}


def test_a_method_registered_with_one_call_is_known_by_name_until_unregistered(tmp_path):
    """Registered: listed, looked up by name, trained by FederatedTrainer; without a tuned rate it falls back to
    FederatedTrainingArguments' default, marked untuned. Unregistered: gone everywhere."""
    with registered_toy() as toy_config:
        assert method_names()[-1] == "toy_lora"
        assert methods_module.CONFIG_CLASSES[-1] is toy_config
        assert methods_module.config_class_for("toy_lora") is toy_config
        assert "toy_lora" not in DEFAULT_LEARNING_RATES and recipe_settings("toy_lora") == {}
        rate = default_learning_rate("toy_lora")
        assert not rate.tuned and "not tuned" in rate.source
        assert rate.value == FederatedTrainingArguments(output_dir=str(tmp_path)).learning_rate
        model = tiny_peft(toy_config)
        trainer = FederatedTrainer(model=model, args=fed_args(tmp_path), train_dataset=toy_dataset(40))
        initial_A, initial_B = lora_tensors(model, "lora_A"), lora_tensors(model, "lora_B")
        trainer.train()
        assert all(torch.equal(t, initial_A[n]) for n, t in lora_tensors(model, "lora_A").items())  # the toy's rule
        assert all(not torch.equal(t, initial_B[n]) for n, t in lora_tensors(model, "lora_B").items())
    assert "toy_lora" not in method_names()
    assert toy_config not in methods_module.CONFIG_CLASSES
    with pytest.raises(ValueError, match="Unknown federated method 'toy_lora'"):
        methods_module.config_class_for("toy_lora")
    with pytest.raises(ValueError, match="Unknown federated method 'toy_lora'"):
        default_learning_rate("toy_lora")


def _toy_variant(**attributes):
    method = type("BadMethod", (ToyMethod,), {"name": "bad_lora", **attributes})
    return dataclasses.make_dataclass("BadConfig", [], bases=(ToyConfig,), namespace={"method_class": method})


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"name": "lora"}, "A method named 'lora' is already registered"),
        ({"name": "Bad-LoRA"}, "name must be a lower-case identifier"),
        ({"display_name": ""}, "display_name must be a non-empty string"),
        ({"description": None}, "description must be a non-empty string"),
        ({"citation": "Sun et al. 2024"}, "citation must be a BibTeX entry"),
        ({"recipe_learning_rate": 0.01}, "recipe_learning_rate must be None"),
        ({"recipe_learning_rate": DefaultLearningRate(-1.0, "sweep")}, "recipe_learning_rate must be None"),
        ({"recipe_settings": {"lr_ratio_c": 0.1}}, r"recipe_settings names \['lr_ratio_c'\]"),
    ],
)
def test_register_method_refuses_an_incomplete_method_naming_the_attribute(attributes, message):
    before = method_names()
    with pytest.raises(ValueError, match=message):
        register_method(_toy_variant(**attributes))
    assert method_names() == before


def test_register_method_refuses_what_is_not_a_config_class():
    with pytest.raises(ValueError, match="a @dataclass subclass of FedLoraConfig"):
        register_method(ToyMethod)
    with pytest.raises(ValueError, match="No method named 'toy_lora' is registered"):
        unregister_method("toy_lora")
