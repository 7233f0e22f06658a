"""Registries declare the choices of an option once: validation refuses any other value (naming the key and the
values it accepts) before any work, the configuration page lists them, a name registered later is accepted, and
every registered strategy has the interface the trainer uses (the Strategy protocol)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import tiny_config
from mokd.config import load_config, reference_markdown
from mokd.data.sources import SOURCES
from mokd.engine.distributed import World
from mokd.engine.optim import OPTIMIZERS
from mokd.engine.plan import input_channels
from mokd.engine.strategies import STRATEGIES, strategy_class
from mokd.engine.strategies.base import SingleStrategy, Strategy
from mokd.errors import ConfigError
from mokd.kernels.attention import BACKENDS, attention
from mokd.kernels.dino_cross_entropy import IMPLS
from mokd.launch import components  # noqa: F401  (every registry, as the launch commands have them)
from mokd.launch.cli import main
from mokd.method.backbones import BACKBONES

REPO = Path(__file__).resolve().parents[1]

# What each option accepts, written out here rather than read from the registries.
EXPECTED = {
    "parallel.strategy": ("single", "ddp", "fsdp", "deepspeed"),
    "modelN.backbone": ("resnet18", "resnet34", "resnet50", "resnet101", "vit_tiny_patch16_224",
                        "vit_small_patch16_224", "vit_base_patch16_224"),
    "data.source": ("fashion_mnist", "imagefolder", "synthetic", "webdataset"),
    "modelN.optim.name": ("sgd", "lars", "adamw"),
    "loss.kernel": ("auto", "triton", "native", "torch", "reference"),
    "head.attention": ("sdpa", "flash", "math"),
}
REGISTRIES = {"parallel.strategy": STRATEGIES, "modelN.backbone": BACKBONES, "data.source": SOURCES,
              "modelN.optim.name": OPTIMIZERS, "loss.kernel": IMPLS, "head.attention": BACKENDS}
EXPECTED_FORMATS = {"single": "dcp", "ddp": "dcp", "fsdp": "dcp", "deepspeed": "deepspeed"}


def refusal(key: str, value: str) -> str:
    return f"{key}='{value}' is not one of {', '.join(EXPECTED[key.replace('model2.', 'modelN.')])}"


@pytest.mark.parametrize("key", list(EXPECTED))
def test_registry_refuses_an_unknown_name_naming_the_key_and_every_choice(key):
    registry = REGISTRIES[key]
    assert registry.key == key and registry.names() == EXPECTED[key]
    with pytest.raises(ConfigError) as error:
        registry.get("no_such_choice")
    assert str(error.value) == refusal(key, "no_such_choice")
    concrete = key.replace("modelN.", "model2.")  # the second model: the error names the model it is about
    with pytest.raises(ConfigError) as error:
        load_config("demo", [f"{concrete}=no_such_choice"])
    assert str(error.value) == refusal(concrete, "no_such_choice")


@pytest.mark.parametrize("key", list(EXPECTED))
def test_registry_refusal_comes_before_any_work(tmp_path, key, capsys):
    run_dir = tmp_path / "run"
    concrete = key.replace("modelN.", "model2.")
    assert main(["train", f"run_dir={run_dir}", f"{concrete}=no_such_choice"]) == 2
    assert refusal(concrete, "no_such_choice") in capsys.readouterr().err
    assert not run_dir.exists()


def page_rows() -> dict[str, list[str]]:
    """{option: [default, accepts, meaning]} of docs/configuration.md's tables."""
    rows = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").replace("\\|", "\0").split("|")]
            rows[cells[0].strip("`")] = [cell.replace("\0", "|") for cell in cells[1:]]
    return rows


@pytest.mark.parametrize("key", list(EXPECTED))
def test_registry_names_and_help_are_on_the_configuration_page(key):
    _, accepts, meaning = page_rows()[key]
    assert accepts == " | ".join(EXPECTED[key])
    for name, help_text in REGISTRIES[key].helps.items():
        assert help_text and help_text in meaning and f"`{name}`" in meaning


def test_registry_entry_added_later_is_accepted_then_refused_when_removed():
    with pytest.raises(ConfigError, match="head.attention='doubled'"):
        load_config("demo", ["head.attention=doubled"])
    BACKENDS.add("doubled", lambda q, k, v, dropout_p: 2 * v, "twice the values (a test's backend)")
    try:
        assert load_config("demo", ["head.attention=doubled"]).head.attention == "doubled"
        assert r"sdpa \| flash \| math \| doubled" in reference_markdown()
        values = torch.randn(1, 2, 3, 4)
        torch.testing.assert_close(attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), values, "doubled"),
                                   2 * values)
    finally:
        BACKENDS.remove("doubled")
    with pytest.raises(ConfigError, match="head.attention='doubled'"):
        load_config("demo", ["head.attention=doubled"])


def test_registry_data_sources_tell_their_channels_without_opening_the_data(tmp_path):
    extra = ["data.synthetic_channels=3", "data.shard_channels=1", "data.shards=/nowhere/{0..1}.tar",
             "data.validation_samples=0", "data.train_samples=0"]
    config = tiny_config(tmp_path, extra=extra)
    expected = {"fashion_mnist": 1, "imagefolder": 3, "synthetic": 3, "webdataset": 1}
    for source, channels in expected.items():
        config.data.source = source
        assert input_channels(config.data) == channels, source


@pytest.mark.parametrize("name", list(EXPECTED["modelN.backbone"]))
def test_registry_backbone_family_of_each_name(tmp_path, name):
    """Each backbone name builds its family's model: token side in pixels (ViT patch or ResNet stride, at full
    size and with small_image) and the options that apply only to the other family."""
    vit = name.startswith("vit_")
    family = BACKBONES.get(name)
    assert family.is_vit == vit
    for small, patch in ((False, 16 if vit else 32), (True, 4 if vit else 8)):
        assert family.patch_size(SimpleNamespace(backbone=name, small_image=small)) == patch
    foreign = "model1.zero_init_last_bn=true" if vit else "model1.depth=2"
    with pytest.raises(ConfigError, match=foreign.split("=")[0]):
        tiny_config(tmp_path, model1=[f"backbone={name}"], extra=[foreign])


def protocol_members() -> tuple[dict[str, inspect.Signature], set[str]]:
    """({method: signature}, {attribute}) that the Strategy protocol declares."""
    methods = {name: inspect.signature(getattr(Strategy, name)) for name in vars(Strategy)
               if not name.startswith("_") and callable(getattr(Strategy, name))}
    return methods, set(Strategy.__annotations__)


def parameters(signature: inspect.Signature) -> list[str]:
    return [name for name in signature.parameters if name not in ("self", "cls")]


@pytest.mark.parametrize("name", list(EXPECTED["parallel.strategy"]))
def test_strategy_protocol_every_registered_strategy_has_the_interface(name):
    cls = strategy_class(name)
    assert cls.name == name and cls.checkpoint_format == EXPECTED_FORMATS[name]
    methods, attributes = protocol_members()
    assert {"setup", "backward", "apply_gradients", "save", "load", "memory_report"} <= set(methods)
    for method, signature in methods.items():
        assert parameters(inspect.signature(getattr(cls, method))) == parameters(signature), (name, method)
    declared = {attribute for klass in cls.__mro__ for attribute in getattr(klass, "__annotations__", {})}
    assert attributes <= declared | set(dir(cls)), (name, attributes - declared)


def test_strategy_protocol_holds_for_a_set_up_single_strategy(tmp_path):
    config = tiny_config(tmp_path)
    strategy = SingleStrategy(config, World(0, 1, 0, torch.device("cpu")), None)
    students = (nn.Linear(3, 2), nn.Linear(2, 2))
    teachers = tuple(nn.Linear(s.in_features, s.out_features) for s in students)
    strategy.setup(students, teachers, lambda network, index: torch.optim.SGD(network.parameters(), lr=0.1))
    assert isinstance(strategy, Strategy)
    with pytest.raises(ConfigError, match="parallel.strategy=single but 2 processes"):
        SingleStrategy(config, World(0, 2, 0, torch.device("cpu")), None)


def test_strategy_protocol_looking_up_deepspeed_does_not_import_it():
    """The deepspeed strategy's class (and its checkpoint format) is known without importing DeepSpeed."""
    script = ("import sys\n"
              "from mokd.engine.strategies import strategy_class\n"
              "assert strategy_class('deepspeed').checkpoint_format == 'deepspeed'\n"
              "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
