"""The bonesoup loader's own checks, without an engine (a toy model with vLLM's load_weights protocol)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bonesoup.vllm.loader import BACKBONES_KEY, PUBLISH_KEY, SoupModelLoader


def _load_config(extra):
    from vllm.config.load import LoadConfig

    return LoadConfig(load_format="bonesoup", model_loader_extra_config=extra)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4), requires_grad=False)

    def load_weights(self, weights):  # like vLLM's: the weight loader asserts shapes
        for name, t in weights:
            assert t.shape == self.w.shape, f"{name}: shape {tuple(t.shape)} does not fit {tuple(self.w.shape)}"
            self.w.data.copy_(t)
        return {"w"}


def test_a_backbone_that_does_not_fit_the_model_is_named(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad-backbone"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    save_file({"w": torch.ones(3)}, str(bad / "model.safetensors"))
    loader = SoupModelLoader(_load_config({BACKBONES_KEY: [str(bad)]}))
    with pytest.raises(ValueError, match=r"backbone '.*bad-backbone' does not load into the model of 'sft-dir'.*"
                                         r"shape \(3,\) does not fit \(4,\)"):
        loader.load_weights(Toy(), SimpleNamespace(model="sft-dir"))


@pytest.mark.parametrize("extra,match", [({}, "needs model_loader_extra_config"),
                                         ({BACKBONES_KEY: "one-dir"}, "list of backbone directories"),
                                         ({BACKBONES_KEY: ["a"], PUBLISH_KEY: "copy"}, "'repack' or 'views'"),
                                         ({BACKBONES_KEY: ["a"], "nope": 1}, "nope")])
def test_bad_loader_config_is_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        SoupModelLoader(_load_config(extra))


def test_own_keys_are_not_passed_to_the_default_loader():
    loader = SoupModelLoader(_load_config({BACKBONES_KEY: ["a", "b"], PUBLISH_KEY: "views"}))
    assert loader.backbones == ["a", "b"] and loader.publish == "views"
    assert loader.load_config.model_loader_extra_config == {} and loader.load_config.load_format == "safetensors"
