from dataclasses import dataclass, field

import pytest

from l2c.config import ConfigError, dump_config, load_config


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    amp: bool = False
    pooling: str | None = None
    optim: Optim = field(default_factory=Optim)

    def validate(self):
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")


def test_yaml_then_overrides_with_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\noptim:\n  lr: 0.1\n")
    cfg = load_config(Cfg, p, ["steps=5", "optim.betas=[0.8, 0.9]", "amp=true", "pooling=mean"])
    assert cfg == Cfg(name="demo", steps=5, amp=True, pooling="mean", optim=Optim(lr=0.1, betas=[0.8, 0.9]))
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(Cfg, tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [("stepz=3", "unknown key"), ("steps=abc", "integer"), ("amp=3", "true/false"), ("steps=0", ">= 1"),
     ("optim.lr=fast", "number"), ("novalue", "key=value")],
)  # fmt: skip
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, None, [override])


def test_every_shipped_yaml_is_claimed_by_a_loader_and_valid():
    """A YAML added under configs/ without a loader here fails: nothing ships unvalidated."""
    from fnmatch import fnmatch

    from l2c.apps.cluster import load_resources, load_runtime_env
    from l2c.apps.scaling import ScalingConfig
    from l2c.config import CONFIG_DIR
    from l2c.eval.suite import SuiteConfig
    from l2c.pipeline.embed_job import EmbedConfig
    from l2c.trainer.text.config import FinetuneTextConfig
    from l2c.trainer.vision.config import TrainConfig

    loaders = {
        "demo.yaml": lambda p: load_config(TrainConfig, p),
        "flickr8k_cpu.yaml": lambda p: load_config(TrainConfig, p),
        "llm2clip_*.yaml": lambda p: load_config(TrainConfig, p),
        "finetune_*.yaml": lambda p: load_config(FinetuneTextConfig, p),
        "scaling.yaml": lambda p: load_config(ScalingConfig, p),
        "ray/runtime_env.yaml": load_runtime_env,
        "ray/resources.yaml": load_resources,
        "eval/*.yaml": lambda p: load_config(SuiteConfig, p),
        "embed/*.yaml": lambda p: load_config(EmbedConfig, p),
    }
    shipped = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(shipped) >= 8
    for path in shipped:
        rel = path.relative_to(CONFIG_DIR).as_posix()
        matches = [load for pattern, load in loaders.items() if fnmatch(rel, pattern)]
        assert len(matches) == 1, f"configs/{rel} has no loader in this test"
        assert matches[0](path) is not None


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: demo\noptim:\n  lr: [0.1\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+, column \d+: not valid YAML"):
        load_config(Cfg, p)


def test_unknown_nested_key_lists_the_section_keys():
    with pytest.raises(ConfigError, match=r"optim.lrr: unknown key; known: lr, betas"):
        load_config(Cfg, None, ["optim.lrr=1"])


def test_file_then_overrides_then_typed_flags(tmp_path):
    """One path from a command line to a typed config: the file, key=value overrides, then the flags typed."""
    import typer
    from typer.testing import CliRunner

    from l2c.config import given, load_config
    from l2c.trainer.text.config import FinetuneTextConfig

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 10\n  lr: 0.001\n  batch_size: 8\nmodel:\n  path: a\n")
    seen = {}
    app = typer.Typer()

    @app.command()
    def cmd(ctx: typer.Context, overrides: list[str] = typer.Argument(None), steps: int = typer.Option(5, "--steps"),
            model: str = typer.Option("minilm", "--model")):  # fmt: skip
        flags = given(ctx, {"train.steps": ("steps", steps), "model.path": ("model", model)})
        seen["flags"] = flags
        seen["cfg"] = load_config(FinetuneTextConfig, path, list(overrides or []), flags)

    assert CliRunner().invoke(app, ["train.lr=0.01", "train.steps=20"]).exit_code == 0
    assert seen["flags"] == {} and (seen["cfg"].train.steps, seen["cfg"].train.lr, seen["cfg"].model.path) == (20, 0.01, "a")
    assert CliRunner().invoke(app, ["train.steps=20", "--steps", "30"]).exit_code == 0
    assert seen["flags"] == {"train.steps": 30} and seen["cfg"].train.steps == 30 and seen["cfg"].train.batch_size == 8
