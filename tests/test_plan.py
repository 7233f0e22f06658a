"""`mokd plan`: per-rank memory by strategy, from real parameter counts and a measured activation footprint."""


from helpers import tiny_config
from mokd.engine.plan import activation_bytes, estimate, format_plan, model_counts
from mokd.launch.cli import main


def test_counts_and_sharding_arithmetic(tmp_path):
    config = tiny_config(tmp_path)
    counts = model_counts(config, 1)
    networks_params = [c.parameters for c in counts]
    assert all(p > 0 for p in networks_params) and all(c.trainable <= c.parameters for c in counts)
    single = estimate(config, 1, 1, activations=(500, 1000))
    zero3 = estimate(tiny_config(tmp_path, extra=["parallel.strategy=deepspeed", "parallel.zero_stage=3"]), 4, 1, (500, 1000))
    zero1 = estimate(tiny_config(tmp_path, extra=["parallel.strategy=deepspeed", "parallel.zero_stage=1"]), 4, 1, (500, 1000))
    # Student parameters: 4 bytes each, whole under single and ZeRO-1, a quarter each under ZeRO-3 with 4 ranks.
    assert single["rows"]["student parameters"] == 4 * sum(networks_params)
    assert zero1["rows"]["student parameters"] == single["rows"]["student parameters"]
    assert zero3["rows"]["student parameters"] == single["rows"]["student parameters"] // 4
    assert zero1["rows"]["optimiser state"] == single["rows"]["optimiser state"] // 4
    assert single["rows"]["activations"] == 500 + 1000 * config.train.batch_size
    assert "zero3 x4" in format_plan([single, zero3])


def test_activations_grow_with_the_crops_and_split_into_fixed_and_per_image(tmp_path):
    fixed_few, few = activation_bytes(tiny_config(tmp_path, extra=["data.n_local_crops=1"]), 1, "cpu")
    fixed_many, many = activation_bytes(tiny_config(tmp_path, extra=["data.n_local_crops=4"]), 1, "cpu")
    assert 0 < few < many
    # The weight-normalised last layers' normalised [K, d] weights are saved once per forward, whatever the batch.
    assert fixed_few > 0 and fixed_many > 0


def test_plan_command_prints_every_strategy(capsys):
    assert main(["plan", "--preset", "demo", "--world-size", "2", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    for column in ("single x1", "ddp x2", "fsdp x2", "zero1 x2", "zero2 x2", "zero3 x2"):
        assert column in out
