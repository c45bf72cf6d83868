"""The text-to-image sampling benchmark's setting parser."""

import pytest

from benchmarks.t2i_sampling import parse_setting
from vlpretrain.lavit.generate import SamplingConfig


def test_settings_become_sampling_config_fields() -> None:
    name, kwargs = parse_setting("g2k5=guidance_scale:2.0,top_k:5")
    assert name == "g2k5" and kwargs == {"guidance_scale": 2.0, "top_k": 5}
    cfg = SamplingConfig(**kwargs)
    assert cfg.guidance_scale == 2.0 and cfg.top_k == 5 and isinstance(cfg.top_k, int)
    assert parse_setting("oracle") == ("oracle", {})


@pytest.mark.parametrize("spec", ["x=nonsense:1", "x=top_k", "x=temperature:0.5,guidance:2"])
def test_unknown_or_malformed_fields_are_refused(spec: str) -> None:
    with pytest.raises(SystemExit, match="SamplingConfig field"):
        parse_setting(spec)
