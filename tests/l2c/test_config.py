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
