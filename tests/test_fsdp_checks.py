"""One-process checks of the FSDP2 set-up in dfactory_hf/parallel/fsdp.py (the multi-process runs are in
tests/distributed/)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from trainer_helpers import demo_model

from dfactory_hf.parallel.fsdp import check_fsdp_wrap_classes, sharded_parameter_count


def _args(names: str | None):
    return SimpleNamespace(fsdp_plugin_args={"transformer_cls_names_to_wrap": names} if names else {})


def test_wrap_class_of_the_model_is_accepted():
    check_fsdp_wrap_classes(demo_model(), _args("LLaDA2MoeDecoderLayer"))
    check_fsdp_wrap_classes(demo_model(), _args(None))  # accelerate then uses _no_split_modules


def test_wrap_class_missing_from_the_model_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"fsdp_transformer_layer_cls_to_wrap \(LlamaDecoderLayer\) names no module "
                                         r"of LLaDA2MoeForCausalLM .*LLaDA2MoeDecoderLayer"):
        check_fsdp_wrap_classes(demo_model(), _args("LlamaDecoderLayer"))


def test_an_unsharded_model_has_no_dtensor_parameters():
    sharded, total = sharded_parameter_count(demo_model())
    assert sharded == 0 and total > 0
